"""QualiCLIP+ on CLIVE-dev: the QualiCLIP+ model against the QualiCLIP model it starts from.

Over ``--splits`` seeded random 70/10/20 splits of the 250 rated CLIVE-dev photos (seeds 123,
124, ...): per split, the test SRCC/PLCC of the QualiCLIP+ model (prompts learnt on the train
split, the epoch of best validation SRCC kept) and of the starting model, on the same test
images; then the medians (the opinion-aware protocol, docs/evaluation.md: the median of the
SRCCs and, separately, of the PLCCs). Then the epoch time with the crop-feature
cache (``plus.cached_crops``) and without it (fresh crops read and encoded every step), on the
first split.

    python benchmarks/bench_plus.py --model outputs/train/checkpoint
    python benchmarks/bench_plus.py --model outputs/train/checkpoint --splits 5 --epochs 50 --crop 384

Paper-level figures need the OpenAI CLIP weights (``model.pretrained: openai``); without them the
starting model is whatever this pipeline trained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import load

from qualiclip.checkpoint import load_checkpoint
from qualiclip.plus import load_labelled, make_splits, train_plus
from qualiclip.schema import PlusConfig

SHARED_DATA = Path(os.environ.get("QUALICLIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="outputs/train/checkpoint", help="the QualiCLIP checkpoint to start from")
    p.add_argument("--clive", default=str(SHARED_DATA / "clive-dev"), help="CLIVE-dev folder (images/, labels.csv)")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--cached-crops", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-epochs", type=int, default=3, help="epochs of each timed run (with and without the cache)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # figures appear as measured
    spec = {
        "name": "csv",
        "root": args.clive,
        "image_dir": "images",
        "mos_range": [0, 100],
        "lower_is_better": False,
    }
    ds = load_labelled(spec)
    print(f"{len(ds)} rated photos; model {args.model}; {load()}")
    rows = []
    for k in range(args.splits):
        seed = 123 + k
        cfg = PlusConfig(
            epochs=args.epochs, crop=args.crop, cached_crops=args.cached_crops, lr=args.lr, seed=seed, device="cpu"
        )
        start = time.perf_counter()
        result = train_plus(load_checkpoint(args.model), ds, cfg, splits=make_splits(ds, seed))
        plus, base = result.metrics["plus"], result.metrics["base"]
        rows.append((plus, base))
        print(
            f"split {k} (seed {seed}, {plus['n']} test images): QualiCLIP+ SRCC {plus['srcc']:.3f} "
            f"PLCC {plus['plcc']:.3f} | QualiCLIP SRCC {base['srcc']:.3f} PLCC {base['plcc']:.3f} "
            f"(best epoch {result.best_epoch}, {time.perf_counter() - start:.0f} s; {load()})"
        )
    for key in ("srcc", "plcc") if rows else ():
        a, b = (statistics.median(r[i][key] for r in rows) for i in (0, 1))
        print(f"median test {key.upper()} over {len(rows)} splits: QualiCLIP+ {a:.3f}, QualiCLIP {b:.3f}")
    cached, fresh = (timed_run(args, ds, n) for n in (args.cached_crops, 0))
    print(f"epoch time, {args.timing_epochs} epochs each, split of seed 123, back to back:")
    for name, (epoch, total, srcc) in (("with the cache", cached), ("without", fresh)):
        print(f"  {name}: {epoch:.2f} s per epoch (median), {total:.0f} s in all, test SRCC {srcc:.3f}; {load()}")
    print(f"  ratio without / with: {fresh[0] / cached[0]:.2f}x per epoch")


def timed_run(args: argparse.Namespace, ds, cached_crops: int) -> tuple[float, float, float]:
    """(median epoch seconds, whole run's seconds including the cache, test SRCC) of one run."""
    cfg = PlusConfig(
        epochs=args.timing_epochs, crop=args.crop, cached_crops=cached_crops, lr=args.lr, seed=123, device="cpu"
    )
    start = time.perf_counter()
    result = train_plus(load_checkpoint(args.model), ds, cfg, splits=make_splits(ds, 123))
    total = time.perf_counter() - start
    return statistics.median(r["seconds"] for r in result.log), total, result.metrics["plus"]["srcc"]


if __name__ == "__main__":
    main()
