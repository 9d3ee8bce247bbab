"""Scoring speed and peak memory of RN50 on the CPU (issue 7).

Images per second of `qualiclip.scoring.score_arrays` with RN50 (random weights: speed does not
depend on them) at 224x224, 512x384, 500x500 and 1024x768, batch 1 vs batched, on 1 and 2
threads, and the peak resident memory of each configuration. Every configuration runs in a fresh
subprocess that loads a saved RN50 checkpoint, so its peak RSS (VmHWM of that process: imports,
model, activations) is its own. Mode ``fast`` is what ``qualiclip score`` does
(`load_scorer`: image encoder only, BatchNorm folded, inference mode); mode ``plain`` loads the
whole checkpoint and scores with the full QualiCLIP module under ``no_grad``,
the way a straightforward port (such as pyiqa's) does, as a reference measured in the same run;
``bf16`` is ``fast`` under CPU bf16 autocast, with its largest score difference from fp32.

    .venv/bin/python benchmarks/bench_scoring.py [--quick] [--json out.json]

Reference (issue 7, pyiqa's qualiclip, same machine kind): 1.37 img/s at 512x384 on 1 thread
(batch 1) with a peak RSS of 1.38 GB; 3.3 img/s at 224x224 on 2 threads. Target: 1.5x that.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"224x224": (224, 224), "512x384": (384, 512), "500x500": (500, 500), "1024x768": (768, 1024)}
REFERENCE = {("512x384", 1): 1.37, ("224x224", 2): 3.3}
REFERENCE_RSS_MB = 1380
ENV = {"DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def child(checkpoint: str, size: str, batch: int, threads: int, mode: str, seconds: float) -> dict:
    """Measure one configuration in this process, loading the model as ``qualiclip score`` does."""
    import numpy as np
    import torch

    from qualiclip.checkpoint import load_checkpoint
    from qualiclip.scoring import load_scorer, score_arrays

    torch.set_num_threads(threads)
    h, w = SIZES[size]
    # plain: the whole CLIP (text tower included), as a straightforward port holds it
    model = load_checkpoint(checkpoint).eval() if mode == "plain" else load_scorer(checkpoint)
    images = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(batch)]
    run = _plain_runner(model, images, batch) if mode == "plain" else (
        lambda: score_arrays(model, images, batch_size=batch, precision="bf16" if mode == "bf16" else "fp32"))
    run()  # warm-up: oneDNN picks its kernels for this shape
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        scores = run()
        n += len(images)
    elapsed = time.perf_counter() - start
    out = {"size": size, "batch": batch, "threads": threads, "mode": mode, "images": n,
           "img_per_s": n / elapsed, "peak_rss_mb": peak_rss_mb(),
           "load_avg": os.getloadavg()[0]}
    if mode == "bf16":
        out["max_abs_diff_vs_fp32"] = float(np.abs(scores - score_arrays(model, images, batch_size=batch)).max())
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own address space;
    ``ru_maxrss`` would also carry the parent's peak across fork + exec (Linux keeps it)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _plain_runner(model, images, batch):
    import numpy as np
    import torch

    def run():
        with torch.no_grad():
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
            return model(x).numpy()

    return run


def configurations(quick: bool) -> list[tuple[str, int, int, str]]:
    sizes = ["512x384", "224x224"] if quick else list(SIZES)
    configs = [(s, b, t, "fast") for s in sizes for t in (1, 2) for b in (1, 8)]
    configs += [("512x384", 1, 1, "plain"), ("224x224", 8, 2, "plain"), ("512x384", 1, 1, "bf16")]
    return configs


def save_random_rn50(folder: str) -> str:
    """An RN50 checkpoint with random weights (speed does not depend on the weights)."""
    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.model import ModelConfig, create_model

    return str(save_checkpoint(create_model(ModelConfig(name="RN50")), Path(folder) / "rn50"))


def run_all(quick: bool, seconds: float) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, __file__, "--save", tmp], capture_output=True, text=True,
                              env={**os.environ, **ENV})
        if proc.returncode != 0:
            raise RuntimeError(f"saving the RN50 checkpoint failed:\n{proc.stderr[-2000:]}")
        checkpoint = proc.stdout.strip().splitlines()[-1]
        for config in configurations(quick):
            results.append(run_one(checkpoint, *config, seconds))
            print(_row(results[-1]), flush=True)
    return results


def run_one(checkpoint: str, size: str, batch: int, threads: int, mode: str, seconds: float) -> dict:
    """One configuration in a fresh process, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", checkpoint, size, str(batch), str(threads), mode,
           "--seconds", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(r: dict) -> str:
    ref = REFERENCE.get((r["size"], r["threads"]))
    vs = f"{r['img_per_s'] / ref:4.2f}x pyiqa" if ref and r["batch"] in (1, 8) else ""
    extra = f" max|bf16-fp32| {r['max_abs_diff_vs_fp32']:.1e}" if "max_abs_diff_vs_fp32" in r else ""
    return (f"| {r['size']:>8} | {r['mode']:>5} | {r['batch']:>2} | {r['threads']} | {r['img_per_s']:6.2f} | "
            f"{r['peak_rss_mb']:6.0f} | {r['load_avg']:4.1f} | {vs}{extra} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=5, metavar=("CKPT", "SIZE", "BATCH", "THREADS", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--save", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration (after a warm-up)")
    p.add_argument("--quick", action="store_true", help="only 512x384 and 224x224")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.save:
        print(save_random_rn50(args.save))
        return
    if args.child:
        ckpt, size, batch, threads, mode = args.child
        print(json.dumps(child(ckpt, size, int(batch), int(threads), mode, args.seconds)))
        return
    print(f"RN50, random weights, CPU; reference rows: pyiqa 512x384/1 thread {REFERENCE[('512x384', 1)]} img/s, "
          f"224x224/2 threads {REFERENCE[('224x224', 2)]} img/s, peak RSS {REFERENCE_RSS_MB} MB")
    print("|     size |  mode |  B | T |  img/s | RSS MB | load | vs reference |\n|---|---|---|---|---|---|---|---|")
    results = run_all(args.quick, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
