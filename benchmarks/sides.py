"""The worker side of bench_vs_reference.py: one process per side (ours or a reference).

A worker builds its side, answers ``READY``, then runs the driver's commands one JSON line at a
time, so the driver can interleave sides call by call (A B A B). Every timing is this process's
CPU time (``time.process_time``: one thread, so CPU seconds are the work done, whatever the
neighbours on a shared machine do) next to wall time.

Sides: ``ours`` (the scorer `qualiclip score` uses, fp32 or bf16), ``before`` (the scorer before
the fast encoder: BatchNorm folded, plain open_clip modules), ``onnx`` (the exported graph in
onnxruntime), ``pyiqa`` (pyiqa 0.1.16's ``qualiclip`` metric), and the distortion sides
``ours-dist`` and ``arniqa``. How the references are built offline is in `load_pyiqa` and
`load_arniqa`; their code is only ever imported from the folders given on the command line.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

from timing import single_thread, timed

CROP = 224
# our distortion name -> ARNIQA's (its utils/utils_data.py); levels are compared by index 1..5
ARNIQA_NAMES = {
    "gaussian_blur": "gaublur",
    "lens_blur": "lensblur",
    "motion_blur": "motionblur",
    "color_diffusion": "colordiff",
    "color_shift": "colorshift",
    "color_saturation1": "colorsat1",
    "color_saturation2": "colorsat2",
    "jpeg2000": "jpeg2000",
    "jpeg": "jpeg",
    "white_noise": "whitenoise",
    "white_noise_cc": "whitenoiseCC",
    "impulse_noise": "impulsenoise",
    "multiplicative_noise": "multnoise",
    "brighten": "brighten",
    "darken": "darken",
    "mean_shift": "meanshift",
    "jitter": "jitter",
    "non_eccentricity_patch": "noneccpatch",
    "pixelate": "pixelate",
    "quantization": "quantization",
    "color_block": "colorblock",
    "high_sharpen": "highsharpen",
    "linear_contrast_change": "lincontrchange",
    "non_linear_contrast_change": "nonlincontrchange",
}


def vm_mib(field: str) -> float:
    """VmHWM / VmRSS of this process in MiB (ru_maxrss would carry the parent's peak over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS, so the next reading is the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Scoring sides: each returns run() -> scores (N,) as a numpy array


def load_images(folder: Path, size: tuple[int, int], batch: int):
    """``batch`` photos resized to ``size`` (W, H): uint8 (H, W, 3) arrays (decoding is not timed)."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    if not files:
        raise SystemExit(f"no images in {folder}")
    out = []
    for i in range(batch):
        with Image.open(files[i % len(files)]) as im:
            out.append(np.asarray(im.convert("RGB").resize(size, Image.BICUBIC)).copy())
    return out


def load_ours(spec: dict, images):
    import numpy as np
    import torch

    from qualiclip.scoring import load_scorer, score_arrays

    load = _scorer_before if spec["side"] == "before" else load_scorer
    scorer = load(spec["checkpoint"]).to(spec["device"])
    precision = spec.get("precision", "fp32")

    def run():
        return np.asarray(
            score_arrays(scorer, images, batch_size=len(images), device=spec["device"], precision=precision)
        )

    return run, (torch.cuda.synchronize if spec["device"] == "cuda" else None)


def _scorer_before(checkpoint):
    """The scorer as it was before the fast encoder: BatchNorm folded into open_clip's own modules."""
    from qualiclip.checkpoint import load_checkpoint
    from qualiclip.scoring import encoder_scorer, fold_batchnorm

    model = load_checkpoint(checkpoint)
    return encoder_scorer(fold_batchnorm(model.visual.eval()), model.prompt_features, model.cfg, fast=False)


def load_onnx(spec: dict, images):
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CUDAExecutionProvider"] if spec["device"] == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(spec["onnx"], opts, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise SystemExit(f"onnxruntime has no {providers[0]} here (providers: {ort.get_available_providers()})")
    batch = np.stack(images)
    return (lambda: sess.run(["score"], {"image": batch})[0]), None


def stub_pkg_resources() -> None:
    """openai-clip imports pkg_resources (gone from setuptools >= 81) only for `packaging`."""
    import types

    import packaging
    import packaging.version  # noqa: F401

    if "pkg_resources" not in sys.modules:
        module = types.ModuleType("pkg_resources")
        module.packaging = packaging
        sys.modules["pkg_resources"] = module


def load_pyiqa(spec: dict, images):
    """pyiqa's ``qualiclip`` metric on our random RN50: its download is pointed at our file."""
    import numpy as np
    import torch

    stub_pkg_resources()
    import pyiqa
    from pyiqa.archs import qualiclip_arch

    qualiclip_arch.load_file_from_url = lambda url, *a, **k: spec["official"]
    metric = pyiqa.create_metric("qualiclip", device=torch.device(spec["device"]), backbone=spec["backbone"])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(spec["device"])

    def run():
        with torch.no_grad():
            return metric(x).flatten().cpu().numpy()

    return run, (torch.cuda.synchronize if spec["device"] == "cuda" else None)


def scoring_worker(spec: dict) -> None:
    loader = {"ours": load_ours, "before": load_ours, "onnx": load_onnx, "pyiqa": load_pyiqa}[spec["side"]]
    images = load_images(Path(spec["images"]), tuple(spec["size"]), spec["batch"])
    run, sync = loader(spec, images)
    build_peak = vm_mib("VmHWM")
    reset = reset_peak()
    first = run()  # warm-up: kernels chosen for this shape; its scores check the sides agree
    serve(
        lambda cmd: _score_calls(run, sync, cmd["n"]),
        ready={"scores": [float(s) for s in first]},
        done=lambda: {"peak_rss_mib": vm_mib("VmHWM") if reset else None, "build_peak_mib": build_peak},
    )


def _score_calls(run, sync, n: int) -> dict:
    cpu, wall = [], []
    for _ in range(n):
        c, w, _ = timed(run, sync)
        cpu.append(c)
        wall.append(w)
    return {"cpu": cpu, "wall": wall}


def bf16_worker(spec: dict) -> None:
    """fp32 vs bf16 autocast on CLIVE-dev photos at full size: score and cosine changes, SRCC."""
    import csv
    import dataclasses

    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from qualiclip.imageio import read_image
    from qualiclip.scoring import load_scorer

    folder = Path(spec["clive"])
    rows = list(csv.DictReader(open(folder / "labels.csv")))[: spec["n"]]
    scorer = load_scorer(spec["checkpoint"])
    scorer.cfg = dataclasses.replace(scorer.cfg, logit_scale=100.0)  # the scale a trained model scores with
    out = {"fp32": [], "bf16": [], "cos_diff": []}
    for row in rows:
        x = torch.from_numpy(read_image(folder / "images" / row["image"]).pixels).permute(2, 0, 1)[None]
        with torch.inference_mode():
            f32 = scorer.similarities(x)  # (1, K, 2) cosines
            with torch.autocast("cpu", dtype=torch.bfloat16):
                b16 = scorer.similarities(x)
        out["fp32"].append(float(scorer.score_from_similarities(f32)[0]))
        out["bf16"].append(float(scorer.score_from_similarities(b16)[0]))
        out["cos_diff"].append(float((f32 - b16).abs().max()))
    mos = [float(r["mos"]) for r in rows]
    diff = np.abs(np.array(out["fp32"]) - np.array(out["bf16"]))
    reply(
        {
            "n": len(rows),
            "max_score_diff": float(diff.max()),
            "mean_score_diff": float(diff.mean()),
            "max_cos_diff": max(out["cos_diff"]),
            "srcc_fp32": spearmanr(out["fp32"], mos)[0],
            "srcc_bf16": spearmanr(out["bf16"], mos)[0],
            "srcc_fp32_bf16": spearmanr(out["fp32"], out["bf16"])[0],
        }
    )


# ---------------------------------------------------------------------------------------------
# Distortion sides


def load_crops(folder: Path, n_images: int = 12):
    """Two 224x224 crops per photo, float32 (H, W, 3) in [0, 1]; the same crops on both sides."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))[:n_images]
    rng = np.random.default_rng(0)
    crops = []
    for f in files:
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        for _ in range(2):
            y, x = rng.integers(0, rgb.shape[0] - CROP + 1), rng.integers(0, rgb.shape[1] - CROP + 1)
            crops.append(np.ascontiguousarray(rgb[y : y + CROP, x : x + CROP]))
    return crops


class OursDistortions:
    """Our registry: a call = draw the random parts + apply one level (both timed)."""

    def __init__(self, crops):
        import numpy as np

        from qualiclip.distortions import get_distortion
        from qualiclip.sampling import render_levels

        self.crops, self.get, self.render = crops, get_distortion, render_levels
        self.rng = np.random.default_rng(1)

    def call(self, name: str, level: int, crop: int) -> tuple[float, float]:
        """(draw CPU s, apply CPU s) for one crop at one level."""
        d, x = self.get(name), self.crops[crop]
        c0 = time.process_time()
        state = d.draw(self.rng, CROP, CROP)
        c1 = time.process_time()
        d.apply(x, level, state)
        return c1 - c0, time.process_time() - c1

    def sample(self, names: list[str], crops: list[int]) -> None:
        """A training sample: 2 crops x 5 levels of the composition (uint8 out, as degrade renders)."""
        composition = [self.get(n) for n in names]
        for c in crops:
            self.render(self.crops[c], composition, self.rng, False)


def load_arniqa(root: Path):
    """ARNIQA's utils/utils_data.py from ``root``, with the run-time shims numpy 2.4 / torch 2.14 need.

    * `dither.so` is loaded with ctypes at import; no distortion calls it, so that one CDLL call
      gets a dummy object (no foreign binary runs).
    * impulse_noise indexes a tensor with a (3, N) numpy array, which torch now reads as one index
      into dim 0: index with ``tuple(...)``, the meaning it had. spline (brighten/darken) stores a
      size-1 array into a scalar slot, which numpy 2 refuses: ``.item()``, the meaning it had.
    The patched functions are recompiled in the module's namespace; the files are not edited.
    """
    import ctypes
    import importlib
    import inspect
    import textwrap

    sys.path.insert(0, str(root))
    real = ctypes.CDLL

    class _Dummy:
        def __getattr__(self, name):
            return _Dummy()

        def __setattr__(self, name, value):
            pass

    ctypes.CDLL = lambda path, *a, **k: _Dummy() if str(path).endswith("dither.so") else real(path, *a, **k)
    try:
        ud = importlib.import_module("utils.utils_data")
    finally:
        ctypes.CDLL = real
    patches = {
        ("distortions", "impulse_noise"): [
            ("x[coords_salt]", "x[tuple(coords_salt)]"),
            ("x[coords_pepper]", "x[tuple(coords_pepper)]"),
        ],
        ("utils_distortions", "spline"): [
            ("y[2] = np.diff(divdif.T).T / (x[2] - x[0])", "y[2] = (np.diff(divdif.T).T / (x[2] - x[0])).item()")
        ],
    }
    for (module_name, fn), edits in patches.items():
        module = importlib.import_module("utils." + module_name)
        src = textwrap.dedent(inspect.getsource(getattr(module, fn)))
        for old, new in edits:
            if src.count(old) != 1:
                raise SystemExit(f"ARNIQA's {module_name}.{fn} changed: cannot apply the shim {old!r}")
            src = src.replace(old, new)
        exec(compile(src, inspect.getsourcefile(module), "exec"), module.__dict__)  # noqa: S102
    ud.distortion_functions["impulsenoise"] = importlib.import_module("utils.distortions").impulse_noise
    return ud


class ArniqaDistortions:
    """ARNIQA's `distort_images` (torch (3, H, W) in [0, 1]); the input clone is not timed."""

    def __init__(self, crops, root: Path):
        import random

        import numpy as np
        import torch

        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        self.ud = load_arniqa(root)
        self.crops = [torch.from_numpy(c).permute(2, 0, 1).contiguous() for c in crops]

    def _fv(self, name: str, level: int):
        ref = ARNIQA_NAMES[name]
        return self.ud.distortion_functions[ref], self.ud.distortion_range[ref][level - 1]

    def call(self, name: str, level: int, crop: int) -> tuple[float, float]:
        f, v = self._fv(name, level)
        x = self.crops[crop].clone()
        c0 = time.process_time()
        self.ud.distort_images(x, distort_functions=[f], distort_values=[v])
        return 0.0, time.process_time() - c0

    def sample(self, names: list[str], crops: list[int]) -> None:
        """2 crops x 5 levels, each level the composition at that level (ref-bench's QualiCLIP sample)."""
        from qualiclip.distortions import LEVELS

        for level in LEVELS:
            fv = [self._fv(n, level) for n in names]
            for c in crops:
                self.ud.distort_images(
                    self.crops[c].clone(), distort_functions=[f for f, _ in fv], distort_values=[v for _, v in fv]
                )


def distortion_worker(spec: dict) -> None:
    crops = load_crops(Path(spec["images"]))
    side = (
        OursDistortions(crops) if spec["side"] == "ours-dist" else ArniqaDistortions(crops, Path(spec["arniqa_root"]))
    )

    def handle(cmd):
        if cmd["op"] == "call":
            times = [side.call(cmd["type"], cmd["level"], (cmd["first"] + i) % len(crops)) for i in range(cmd["n"])]
            return {"draw": [d for d, _ in times], "apply": [a for _, a in times]}
        cpu = []
        for names, pair in cmd["samples"]:
            c, _, _ = timed(functools.partial(side.sample, names, pair))
            cpu.append(c)
        return {"cpu": cpu}

    serve(handle, ready={"crops": len(crops)}, done=dict)


# ---------------------------------------------------------------------------------------------
# The command loop


def serve(handle, ready: dict, done) -> None:
    """READY, then one JSON reply per JSON command line until ``{"op": "quit"}``."""
    reply({"ready": True, **ready})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            reply(done())
            return
        reply(handle(cmd))


def reply(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(spec: dict) -> None:
    single_thread()
    if spec.get("site"):
        sys.path.insert(0, spec["site"])
    if spec["side"] == "bf16-check":
        return bf16_worker(spec)
    (distortion_worker if spec["side"] in ("ours-dist", "arniqa") else scoring_worker)(spec)
