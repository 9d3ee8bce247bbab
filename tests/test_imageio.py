"""Safe image reading: modes, orientation, guards and path safety (qualiclip.imageio)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from imagefiles import encode, finishes_despite_fifos, noise, png_header_only  # noqa: E402
from PIL import Image

from qualiclip.identity import pixel_hash
from qualiclip.imageio import (
    ImageReadError,
    PathOutsideRootError,
    decode_image,
    iter_image_files,
    read_image,
    resolve_inside,
    scan_tree,
)


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(ImageReadError) as info:
        decode_image(data, **kw)
    return info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip_exactly(fmt):
    pixels = noise(1)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(pixels), fmt, **kw))
    assert out.format == fmt and out.mode == "RGB"
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (48, 64, 3)
    np.testing.assert_array_equal(out.pixels, pixels)


def test_grey_and_one_bit_become_three_equal_channels():
    grey = noise(2, channels=1)
    out = decode_image(encode(Image.fromarray(grey), "PNG"))
    assert out.mode == "L"
    np.testing.assert_array_equal(out.pixels, np.repeat(grey[:, :, None], 3, axis=2))
    bits = decode_image(encode(Image.fromarray(grey > 127), "PNG"))
    assert bits.mode == "1" and set(np.unique(bits.pixels)) <= {0, 255}


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    assert out.mode == "I;16"
    assert out.pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_alpha_is_composited_over_the_declared_background():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: background
    rgba[1, 0] = (0, 0, 0, 128)  # half: halfway to the background
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    white = decode_image(data).pixels
    assert white[0, 0].tolist() == [200, 100, 50] and white[0, 1].tolist() == [255, 255, 255]
    assert white[1, 0].tolist() == [127, 127, 127]
    grey_bg = decode_image(data, background=(10, 20, 30)).pixels
    assert grey_bg[0, 1].tolist() == [10, 20, 30]


def test_palette_with_transparency_and_cmyk():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = decode_image(encode(pal, "PNG", transparency=0), background=(0, 255, 0))
    assert out.mode == "P"
    assert out.pixels[0, 0].tolist() == [0, 255, 0] and out.pixels[1, 1].tolist() == [255, 0, 0]
    cmyk = decode_image(encode(Image.fromarray(noise(3)).convert("CMYK"), "JPEG"))
    assert cmyk.mode == "CMYK" and cmyk.pixels.shape == (48, 64, 3)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(noise(4)), "JPEG", exif=exif.tobytes())
    out = decode_image(data)
    assert out.orientation == 6 and (out.width, out.height) == (48, 64)


def test_pixel_guard_runs_before_decoding_and_leaves_pillow_global_alone():
    before = Image.MAX_IMAGE_PIXELS
    assert reason_of(png_header_only(100_000, 100_000)) == "too_large"  # 10^10 px, no data
    assert reason_of(encode(Image.fromarray(noise(5)), "PNG"), max_pixels=64 * 48 - 1) == "too_large"
    assert decode_image(encode(Image.fromarray(noise(5)), "PNG"), max_pixels=64 * 48).width == 64
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_raised_limit_admits_what_pillow_alone_would_refuse(monkeypatch):
    """Pillow refuses > 2 x MAX_IMAGE_PIXELS on its own; our configurable limit decides instead."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 = 3072 > 2 x 1000
    data = encode(Image.fromarray(noise(5)), "PNG")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert decode_image(data, max_pixels=10_000).width == 64
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "zero_bytes"),
        (b"just some notes, not a picture\n", "not_an_image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not_an_image"),  # Ghostscript is never invoked
        (encode(Image.fromarray(np.zeros((8, 8), np.float32)), "TIFF"), "unsupported_mode"),
    ],
)
def test_bad_bytes_get_a_reason(data, reason):
    assert reason_of(data) == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP"])
def test_truncated_files_are_errors(fmt):
    data = encode(Image.fromarray(noise(6, 128, 128)), fmt)
    assert reason_of(data[: len(data) // 2]) == "truncated"


def test_read_image_reads_a_path_and_names_it_in_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(noise(7)), "PNG"))
    assert read_image(tmp_path / "a.png").pixels.shape == (48, 64, 3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg: zero_bytes"):
        read_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "missing.png")
    assert info.value.reason == "unreadable"


def test_pixel_hash_depends_on_pixels_and_shape():
    a = noise(8)
    assert pixel_hash(a) == pixel_hash(a.copy())
    assert pixel_hash(a) != pixel_hash(a.reshape(64, 48, 3))


def test_scan_is_sorted_recursive_case_insensitive_and_skips_dir_links(tmp_path):
    for rel in ["b.png", "a/z.JPG", "a/b/c.jpeg", "notes.txt", "A.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "loop")  # a cycle-prone link is listed, not walked
    scan = scan_tree(tmp_path, (".png", ".jpg", ".jpeg"))
    rel = [p.relative_to(tmp_path).as_posix() for p in scan.images]
    assert rel == ["A.png", "a/b/c.jpeg", "a/z.JPG", "b.png"]
    assert [p.name for p in scan.others] == ["notes.txt"] and [p.name for p in scan.dir_links] == ["loop"]
    assert iter_image_files(tmp_path, (".png", ".jpg", ".jpeg")) == scan.images


def test_resolve_inside_rejects_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    root.mkdir()
    outside.write_bytes(b"x")
    (root / "in.png").write_bytes(b"x")
    os.symlink(root / "in.png", root / "link_in.png")
    os.symlink(outside, root / "link_out.png")
    assert resolve_inside(root, "link_in.png") == (root / "in.png").resolve()
    with pytest.raises(PathOutsideRootError, match="outside the source root"):
        resolve_inside(root, "link_out.png")
    with pytest.raises(PathOutsideRootError):
        resolve_inside(root, "../outside.png")


def test_a_huge_file_of_random_bytes_is_rejected_from_its_first_bytes(tmp_path):
    import tracemalloc

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # 512 MB: 4 KB of random bytes, the rest a hole in a sparse file
        f.write(np.random.default_rng(0).bytes(4096))
        f.truncate(512 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError) as info:
            read_image(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "not_an_image"
    assert peak < 1 << 20, f"{peak} bytes allocated to reject it"


def test_special_files_are_refused_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError) as info:
        finishes_despite_fifos(lambda: read_image(tmp_path / "pipe.png"), [tmp_path / "pipe.png"])
    assert info.value.reason == "not_a_file" and "FIFO" in info.value.detail
    with pytest.raises(ImageReadError) as info:
        read_image("/dev/zero")  # a device: endless zeros
    assert info.value.reason == "not_a_file" and "character device" in info.value.detail
    os.symlink("loop.png", tmp_path / "loop.png")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "loop.png")
    assert info.value.reason == "symlink_loop"
