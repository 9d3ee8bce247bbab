"""The degradation model: registry, per-type contracts, and monotone severity on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from qualiclip.distortions import (
    GROUPS,
    Distortion,
    UnknownDistortionError,
    _ops,
    contact_sheet,
    get_distortion,
    list_distortions,
)

NAMES = list_distortions()
LEVELS = range(1, 6)
KODAK = ("kodim01.png", "kodim05.png", "kodim13.png", "kodim19.png", "kodim23.png")
# Full-reference distance per type: 1 - SSIM where the damage is structural (blur, geometric
# displacement, resampling), mean absolute error elsewhere.
SSIM_TYPES = {"gaussian_blur", "lens_blur", "motion_blur", "jitter", "non_eccentricity_patch", "pixelate"}
# Types whose severity is increasing on average but not on every crop (docs/distortions.md).
MEAN_ONLY_TYPES = {"color_shift"}


def synthetic(height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient plus texture: float32 (H, W, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1)
    return np.clip(0.8 * base + 0.2 * rng.random((height, width, 3)), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def crops(kodak_dir) -> list[np.ndarray]:
    """Two 224x224 crops (top-left and centre) of each of a few Kodak photos."""
    out = []
    for name in KODAK:
        photo = np.asarray(Image.open(kodak_dir / name).convert("RGB"), dtype=np.float32) / 255.0
        h, w = photo.shape[:2]
        for y, x in ((0, 0), ((h - 224) // 2, (w - 224) // 2)):
            out.append(np.ascontiguousarray(photo[y : y + 224, x : x + 224]))
    return out


def arrays_of(state: object) -> list[np.ndarray]:
    """The arrays inside a drawn state (an array, a tuple of arrays, or a scalar / None)."""
    if isinstance(state, np.ndarray):
        return [state]
    return [a for a in state if isinstance(a, np.ndarray)] if isinstance(state, tuple) else []


def distance(name: str, pristine: np.ndarray, distorted: np.ndarray) -> float:
    if name in SSIM_TYPES:
        return 1.0 - structural_similarity(pristine, distorted, channel_axis=2, data_range=1.0)
    return float(np.abs(distorted - pristine).mean())


# ---- registry -------------------------------------------------------------------------------


def test_registry_has_24_types_in_7_groups_that_partition_them():
    assert len(NAMES) == 24 == len(set(NAMES))
    assert list(GROUPS) == ["blur", "color", "compression", "noise", "brightness", "spatial", "sharpness_contrast"]
    assert [n for g in GROUPS.values() for n in g] == NAMES
    for group, names in GROUPS.items():
        assert list_distortions(group) == list(names)
        assert all(get_distortion(n).group == group for n in names)


def test_every_type_has_five_levels():
    for name in NAMES:
        d = get_distortion(name)
        assert isinstance(d, Distortion) and d.name == name and len(d.levels) == 5


def test_unknown_name_suggests_the_close_match():
    with pytest.raises(UnknownDistortionError) as info:
        get_distortion("gausian_blur")
    assert str(info.value) == "unknown distortion 'gausian_blur' — did you mean 'gaussian_blur'?"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(UnknownDistortionError, match="did you mean 'noise'"):
        list_distortions("nois")


def test_apply_rejects_bad_level_and_bad_image():
    d = get_distortion("jpeg")
    with pytest.raises(ValueError, match="level"):
        d.apply(synthetic(), 0, None)
    with pytest.raises(ValueError, match="float32"):
        d.apply(synthetic().astype(np.float64), 1, None)


# ---- per-type contracts ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_contract_shape_range_determinism_no_mutation(name):
    d = get_distortion(name)
    image = synthetic(48, 72)
    before = image.copy()
    state = d.draw(np.random.default_rng(7), 48, 72)
    state_bytes = [a.tobytes() for a in arrays_of(state)]
    twin = d.draw(np.random.default_rng(7), 48, 72)
    for level in LEVELS:
        out = d.apply(image, level, state)
        assert out.shape == image.shape and out.dtype == np.float32 and out.flags.c_contiguous
        assert 0.0 <= out.min() and out.max() <= 1.0
        assert not np.shares_memory(out, image)
        assert out.tobytes() == d.apply(image, level, twin).tobytes()  # same seed, same bytes
    assert np.array_equal(image, before)
    assert [a.tobytes() for a in arrays_of(state)] == state_bytes
    wild = image * 1.6 - 0.3  # out of range: the output is clipped all the same
    assert all(
        0.0 <= d.apply(wild, level, state).min() and d.apply(wild, level, state).max() <= 1.0 for level in LEVELS
    )


@pytest.mark.parametrize("name", NAMES)
def test_level_one_is_not_the_identity(name, crops):
    d = get_distortion(name)
    for i, crop in enumerate(crops[:4]):
        out = d.apply(crop, 1, d.draw(np.random.default_rng(i), 224, 224))
        assert np.abs(out - crop).max() > 1.0 / 255.0, f"{name} level 1 leaves crop {i} unchanged"


@pytest.mark.parametrize("name", sorted(set(NAMES) - MEAN_ONLY_TYPES))
def test_severity_strictly_increases_on_every_crop(name, crops):
    d = get_distortion(name)
    for i, crop in enumerate(crops):
        state = d.draw(np.random.default_rng(100 + i), 224, 224)
        dist = [0.0] + [distance(name, crop, d.apply(crop, level, state)) for level in LEVELS]
        assert all(a < b for a, b in zip(dist, dist[1:])), f"{name} crop {i}: {np.round(dist, 5)}"


@pytest.mark.parametrize("name", sorted(MEAN_ONLY_TYPES))
def test_severity_strictly_increases_on_average(name, crops):
    d = get_distortion(name)
    rows = []
    for i, crop in enumerate(crops):
        state = d.draw(np.random.default_rng(100 + i), 224, 224)
        rows.append([distance(name, crop, d.apply(crop, level, state)) for level in LEVELS])
    mean = [0.0] + list(np.mean(rows, axis=0))
    assert all(a < b for a, b in zip(mean, mean[1:])), f"{name}: {np.round(mean, 5)}"


# ---- the random parts -------------------------------------------------------------------------


def test_impulse_hits_are_nested_across_levels():
    d = get_distortion("impulse_noise")
    image = np.full((64, 64, 3), 0.5, np.float32)
    state = d.draw(np.random.default_rng(0), 64, 64)
    hits = [d.apply(image, level, state) != 0.5 for level in LEVELS]
    assert all(np.all(lo <= hi) for lo, hi in zip(hits, hits[1:]))


def test_impulse_hits_each_level_at_its_density_and_a_seed_pins_the_hits():
    """The sparse draw (docs/distortions.md): hit fractions match the densities, and seed 0 gives
    these exact images (pinned: a change to the draw must be deliberate)."""
    import hashlib

    d = get_distortion("impulse_noise")
    image = np.full((224, 224, 3), 0.5, np.float32)
    outs = [d.apply(image, level, d.draw(np.random.default_rng(0), 224, 224)) for level in LEVELS]
    for out, density in zip(outs, d.levels):
        hit = out != 0.5
        assert abs(hit.mean() - density) < 0.15 * density + 2e-4
        assert abs((out[hit] == 1.0).mean() - 0.5) < 0.1  # half salt, half pepper
    digest = hashlib.sha256(b"".join(o.tobytes() for o in outs)).hexdigest()
    assert digest[:16] == "bf8f3b65e88ebe88"


@pytest.mark.parametrize("batch", [None, 7])
def test_bernoulli_positions_pick_each_element_independently(batch):
    """Impulse noise's candidates (docs/distortions.md, "Noise draws"): sorted distinct positions
    inside [0, n), a Binomial(n, p) count, every element equally likely; a small ``batch`` takes
    the path that reads further words, with the same properties."""
    from qualiclip.distortions import noise

    n, p = 3000, 0.05
    counts, hits = [], np.zeros(n)
    for seed in range(400):
        at, words = noise.bernoulli_positions(np.random.default_rng(seed), n, p, batch)
        assert at.dtype == np.int64 and len(words) == len(at)
        assert len(at) == 0 or (at[0] >= 0 and at[-1] < n and np.all(np.diff(at) > 0))
        counts.append(len(at))
        hits[at] += 1
    assert abs(np.mean(counts) - n * p) < 4 * np.sqrt(n * p * (1 - p) / 400)
    assert abs(np.var(counts) / (n * p * (1 - p)) - 1) < 0.25
    per_tenth = hits.reshape(10, -1).sum(axis=1)  # 6,000 expected hits per tenth of the range
    assert np.all(np.abs(per_tenth - per_tenth.mean()) < 5 * np.sqrt(per_tenth.mean()))
    with pytest.raises(ValueError, match="p must be in"):
        noise.bernoulli_positions(np.random.default_rng(0), n, 0.0)


def test_normal_table_is_a_symmetric_unit_variance_quantile_table():
    """The 65,536 values a Gaussian draw takes (docs/distortions.md, "Noise draws"): the normal's
    quantiles at the bin midpoints, exactly symmetric, mean 0 and variance 1."""
    from statistics import NormalDist

    from qualiclip.distortions import noise

    table = noise.normal_table()
    assert table.dtype == np.float32 and table.shape == (65536,) and not table.flags.writeable
    assert np.all(np.diff(table) > 0)
    assert np.array_equal(table, -table[::-1])
    z = table.astype(np.float64)
    assert z.mean() == 0.0 and abs((z * z).mean() - 1.0) < 1e-6
    for i in (0, 100, 20000, 40000, 65535):  # a quantile table, only rescaled by 1 + 1e-5
        assert table[i] == pytest.approx(NormalDist().inv_cdf((i + 0.5) / 65536), rel=2e-5)


def test_normal_draw_is_gaussian_uses_ceil_n_over_4_words_and_a_seed_pins_it():
    """A field takes 16 random bits per value: ceil(n/4) raw words, low bits first (the next draw
    continues the stream exactly there); its values are standard normal; seed 0 gives these exact
    white-noise images (pinned: a change to the draw must be deliberate, with a shard-format bump)."""
    import hashlib

    from qualiclip.distortions import noise

    rng = np.random.default_rng(0)
    field = noise.draw_normal(rng, 7, 5)  # 105 values: 27 words, the last one's top 16 bits unused
    after = np.random.default_rng(0)
    words = after.bit_generator.random_raw(27)
    assert field.shape == (7, 5, 3) and field.dtype == np.float32 and not field.flags.writeable
    bits = [(int(w) >> (16 * j)) & 0xFFFF for w in words for j in range(4)][:105]
    assert np.array_equal(field.reshape(-1), noise.normal_table()[bits])
    assert rng.bit_generator.random_raw() == after.bit_generator.random_raw()

    big = noise.draw_normal(np.random.default_rng(1), 512, 512).astype(np.float64).reshape(-1)
    assert abs(big.mean()) < 0.005 and abs(big.std() - 1.0) < 0.005
    assert abs((np.abs(big) > 1.959964).mean() - 0.05) < 0.002  # the two-sided 5 % tail
    assert abs((big < -1.0).mean() - 0.158655) < 0.003

    d = get_distortion("white_noise")
    image = np.full((224, 224, 3), 0.5, np.float32)
    state = d.draw(np.random.default_rng(0), 224, 224)
    outs = [d.apply(image, level, state) for level in LEVELS]
    digest = hashlib.sha256(b"".join(o.tobytes() for o in outs)).hexdigest()
    assert digest[:16] == "390fd97a9f727e74"


@pytest.mark.parametrize("name", ["mean_shift", "linear_contrast_change"])
def test_signed_variants_draw_both_signs_and_keep_one_per_crop(name):
    d = get_distortion(name)
    signs = {d.draw(np.random.default_rng(seed), 8, 8) for seed in range(20)}
    assert signs == {1.0, -1.0}
    image = synthetic()
    for sign in (1.0, -1.0):
        moves = [np.sign(np.mean(d.apply(image, level, sign) - image)) for level in LEVELS]
        assert len(set(moves)) == 1, moves


def test_color_blocks_of_a_level_contain_the_lower_levels():
    d = get_distortion("color_block")
    image = synthetic(224, 224)
    state = d.draw(np.random.default_rng(3), 224, 224)
    changed = [np.any(d.apply(image, level, state) != image, axis=2) for level in LEVELS]
    assert all(np.all(lo <= hi) and lo.sum() < hi.sum() for lo, hi in zip(changed, changed[1:]))


# ---- building blocks ----------------------------------------------------------------------------


def test_uint8_round_trip_rounds_instead_of_truncating():
    x = np.array([254.6, 0.4, 127.5001], np.float32) / 255.0
    assert _ops.to_uint8(x).tolist() == [255, 0, 128]


def test_to_uint8_is_the_numpy_formula_bit_for_bit():
    """OpenCV's scale-round-saturate equals clip, *255, rint (ties to even), cast: on values
    outside [0, 1], on exact ties and in any shape."""
    rng = np.random.default_rng(0)
    ties = (np.arange(256, dtype=np.float32) + 0.5) / 255.0
    huge = np.array([np.inf, -np.inf, 3e38, -3e38, 1e7, -1e7, 1.0 + 1e-7, -1e-30, -0.0], np.float32)
    for x in (rng.random((2, 5, 16, 16, 3), dtype=np.float32) * 1.6 - 0.3, ties, synthetic(), huge):
        expected = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        assert np.array_equal(_ops.to_uint8(x), expected)
    assert np.array_equal(
        _ops.from_uint8(np.arange(256, dtype=np.uint8)), np.arange(256).astype(np.float32) * np.float32(1 / 255)
    )


def test_compression_equals_a_pillow_round_trip(crops):
    """jpeg and jpeg2000 go through OpenCV; the pixels are those of Pillow's encoder and decoder."""
    import io

    def pillow(image, **save_args):
        buffer = io.BytesIO()
        Image.fromarray(_ops.to_uint8(image), "RGB").save(buffer, **save_args)
        with Image.open(buffer) as decoded:
            return _ops.from_uint8(np.asarray(decoded.convert("RGB")))

    jpeg, j2k = get_distortion("jpeg"), get_distortion("jpeg2000")
    for crop in crops[:4] + [synthetic(37, 53)]:
        for level in LEVELS:
            quality, ratio = jpeg.levels[level - 1], j2k.levels[level - 1]
            assert np.array_equal(jpeg.apply(crop, level, None), pillow(crop, format="JPEG", quality=quality))
            resolutions = min(8, int(np.log2(min(crop.shape[:2]))) + 1)
            expected = pillow(
                crop,
                format="JPEG2000",
                quality_mode="rates",
                quality_layers=[float(ratio)],
                num_resolutions=resolutions,
                progression="LRCP",
            )
            assert np.array_equal(j2k.apply(crop, level, None), expected)


def test_colour_conversions_agree_with_scikit_image():
    from skimage import color

    image = synthetic(16, 16)
    # OpenCV's float Lab interpolates its gamma and cube-root tables: within 0.6 Lab units of
    # the exact formula, and an RGB round trip within one 8-bit code (docs/distortions.md).
    assert np.allclose(_ops.rgb_to_lab(image), color.rgb2lab(image), atol=0.6)
    assert np.allclose(_ops.lab_to_rgb(_ops.rgb_to_lab(image)), image, atol=1.0 / 255.0)
    hsv = _ops.rgb_to_hsv(image)
    ref = color.rgb2hsv(image)
    assert np.allclose(hsv[..., 1:], ref[..., 1:], atol=1e-5)
    assert np.allclose(hsv[..., 0] / 360.0, ref[..., 0], atol=1e-4)


def test_desaturation_to_zero_gives_grey():
    out = get_distortion("color_saturation1").apply(synthetic(), 4, None)  # factor 0
    assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])


def test_contact_sheet_has_a_row_per_type_and_a_column_per_level():
    image = (synthetic(100, 120) * 255).astype(np.uint8)
    sheet = contact_sheet(image, names=["jpeg", "white_noise"], crop=48)
    one_row = contact_sheet(image, names=["jpeg"], crop=48)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[1] >= 6 * 48 and sheet.shape[0] > one_row.shape[0] >= 48
    assert np.array_equal(contact_sheet(image, names=["jpeg"], crop=48), one_row)


@pytest.mark.parametrize("pristine", [False, True])
def test_render_levels_equals_the_stack_of_float_levels_in_uint8(pristine):
    """A sample's levels go to uint8 one by one (sampling.render_levels): the same bytes as the
    whole float stack converted at once, for every type alone and for compositions of four."""
    from qualiclip.sampling import render_levels

    image = synthetic(48, 40)
    compositions = [[n] for n in NAMES] + [
        ["white_noise", "jpeg", "color_block", "motion_blur"],
        ["impulse_noise", "brighten", "jitter", "color_shift"],
    ]
    for names in compositions:
        composition = [get_distortion(n) for n in names]
        got = render_levels(image, composition, np.random.default_rng(5), pristine)
        rng = np.random.default_rng(5)
        states = [d.draw(rng, 48, 40) for d in composition]
        levels = [image] if pristine else []
        for level in LEVELS:
            x = image
            for d, state in zip(composition, states):
                x = d.apply(x, level, state)
            levels.append(x)
        assert got.dtype == np.uint8 and np.array_equal(got, _ops.to_uint8(np.stack(levels))), names
