"""Speed of the degradation model on one core (issue 3).

Prints the median milliseconds of ``Distortion.apply`` for every type and level on 224x224
crops of real photos, the cost of ``draw``, and QualiCLIP samples per second (2 crops x 5
levels, state drawn once per crop; one random type, and up to 4 composed types from distinct
groups), next to the reference implementation's figures quoted in issue 3.

    .venv/bin/python benchmarks/bench_distortions.py [--images DIR] [--reps 15] [--samples 150]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from qualiclip.distortions import GROUPS, LEVELS, N_LEVELS, get_distortion, list_distortions

CROP = 224
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak" / "images"
# Issue 3: the reference (ARNIQA, torch + kornia), median ms per call on 1 core, level 1 -> 5.
REFERENCE_MS = {
    "color_diffusion": "19-364", "jitter": "53-102", "jpeg2000": "24-29", "color_shift": "17",
    "high_sharpen": "13-16", "brighten": "12", "linear_contrast_change": "9",
    "gaussian_blur": "1.4-31", "lens_blur": "1.2-21",
}
REFERENCE_SAMPLES_PER_S = {"single": 6.7, "composed": 2.4}


def single_thread() -> None:
    """One core: OpenCV and torch (if importable) single-threaded."""
    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def load_photos(folder: Path, limit: int = 8) -> list[np.ndarray]:
    """Up to ``limit`` photos as float32 RGB in [0, 1]; scikit-image's samples if ``folder`` is absent."""
    paths = sorted(folder.glob("*.png"))[:limit] if folder.is_dir() else []
    if paths:
        return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    from skimage import data

    print(f"({folder} absent: using scikit-image sample photos)")
    return [data.astronaut().astype(np.float32) / 255.0, data.chelsea().astype(np.float32) / 255.0]


def random_crop(rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    y = rng.integers(0, photo.shape[0] - CROP + 1)
    x = rng.integers(0, photo.shape[1] - CROP + 1)
    return np.ascontiguousarray(photo[y:y + CROP, x:x + CROP])


def time_types(photos: list[np.ndarray], reps: int) -> None:
    """Median ms per apply call, per type and level, over ``reps`` crops (state drawn per crop)."""
    rng = np.random.default_rng(0)
    crops = [random_crop(rng, photos[i % len(photos)]) for i in range(reps)]
    print(f"{'type':28s}" + "".join(f"{'L' + str(l):>7s}" for l in LEVELS)
          + f"{'draw':>7s}   reference ms (issue 3)")
    for name in list_distortions():
        d = get_distortion(name)
        times = [[] for _ in range(N_LEVELS)]
        draws = []
        for crop in crops:
            t0 = time.perf_counter()
            state = d.draw(rng, CROP, CROP)
            draws.append(time.perf_counter() - t0)
            for level in LEVELS:
                t0 = time.perf_counter()
                d.apply(crop, level, state)
                times[level - 1].append(time.perf_counter() - t0)
        row = "".join(f"{1e3 * statistics.median(t):7.2f}" for t in times)
        print(f"{name:28s}{row}{1e3 * statistics.median(draws):7.2f}   {REFERENCE_MS.get(name, '<10')}")


def pick_types(rng: np.random.Generator, max_types: int) -> list[str]:
    """METHOD.md section 3: n ~ U{1..max_types} distinct groups, one type uniformly in each."""
    groups = list(GROUPS)
    n = int(rng.integers(1, max_types + 1))
    chosen = rng.choice(len(groups), size=n, replace=False)
    return [GROUPS[groups[g]][rng.integers(len(GROUPS[groups[g]]))] for g in chosen]


def make_levels(rng: np.random.Generator, crop: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The 5 levels of one crop under a composition: states drawn once, reused at every level."""
    dists = [get_distortion(n) for n in names]
    states = [d.draw(rng, *crop.shape[:2]) for d in dists]
    out = []
    for level in LEVELS:
        x = crop
        for d, s in zip(dists, states):
            x = d.apply(x, level, s)
        out.append(x)
    return out


def samples_per_second(photos: list[np.ndarray], n_samples: int, max_types: int, seed: int = 0) -> float:
    """QualiCLIP samples/s: 2 crops x 5 levels each, composition of up to ``max_types`` types."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(n_samples):
        names = pick_types(rng, max_types)
        photo = photos[i % len(photos)]
        for _ in range(2):
            make_levels(rng, random_crop(rng, photo), names)
    return n_samples / (time.perf_counter() - t0)


def lead_sampler_per_second(photos: list[np.ndarray], n_samples: int, max_types: int) -> float | None:
    """The same figure through ``qualiclip.sampling.make_sample`` (uint8 in and out, crops cut
    from the full photo), or None where that module or its interface is missing."""
    try:
        from qualiclip.sampling import SampleConfig, make_sample
    except ImportError:
        return None
    cfg = SampleConfig(max_distortions=max_types)
    images = [np.rint(p * 255).astype(np.uint8) for p in photos]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n_samples):
        make_sample(images[i % len(images)], cfg, rng)
    return n_samples / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--reps", type=int, default=15, help="crops per type for the per-call timings")
    parser.add_argument("--samples", type=int, default=150, help="samples per samples/s figure")
    args = parser.parse_args()
    single_thread()
    photos = load_photos(args.images)
    time_types(photos, args.reps)
    for label, max_types in (("single", 1), ("composed", 4)):
        sps = samples_per_second(photos, args.samples, max_types)
        ref = REFERENCE_SAMPLES_PER_S[label]
        print(f"samples/s/core, {label:8s} (up to {max_types} types): {sps:6.1f}   "
              f"reference {ref}, target {3 * ref:.0f}   ({sps / ref:.1f}x the reference)")
        lead = lead_sampler_per_second(photos, args.samples, max_types)
        if lead is not None:
            print(f"  through qualiclip.sampling.make_sample:      {lead:6.1f}")


if __name__ == "__main__":
    main()
