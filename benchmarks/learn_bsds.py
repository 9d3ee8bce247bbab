"""Does it learn? Train the default tiny model from scratch on BSDS500, evaluate on Kodak + CLIVE.

Issue 5's learning proof, scaled to the time at hand: pristine photos from
../shared/data/bsds500 (all 500 as training images), the held-out synthetic ranking on the 24
Kodak photos (all 24 types x 5 levels), and SRCC/PLCC on the 250 CLIVE images of clive-dev.
Prints the figures and the wall time of each stage. Usage:

    python benchmarks/learn_bsds.py --steps 1200 --work /tmp/learn
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from qualiclip import stages

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def params(args, sources: list[str], val_fraction: float, split: str) -> dict:
    return {
        "model": {"name": "qualiclip-tiny-rn", "pretrained": None},
        "tracking": {"backend": "none"},
        "ingest": {"sources": sources, "min_size": 224, "val_fraction": val_fraction},
        "degrade": {"variants": args.variants, "workers": 2, "crop": 224},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "num_workers": 1, "log_every": 50},
        "evaluate": {"split": split, "crop": 224, "baseline": True, "datasets": [
            {"name": "csv", "root": str(SHARED / "clive-dev"), "labels": "labels.csv", "image_dir": "images",
             "mos_range": [0, 100], "lower_is_better": False, "label": "clive_dev"}]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--work", default="/tmp/qualiclip-learn")
    args = ap.parse_args()
    for name in ("bsds500", "kodak", "clive-dev"):
        if not (SHARED / name).is_dir():
            raise SystemExit(f"{SHARED / name} is absent: this benchmark needs ../shared/data")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_p, eval_p = work / "params_train.yaml", work / "params_eval.yaml"
    train_p.write_text(yaml.safe_dump(params(args, [str(SHARED / "bsds500" / "images")], 0.0, "train")))
    eval_p.write_text(yaml.safe_dump(params(args, [str(SHARED / "kodak" / "images")], 0.0, "train")))
    timings = {}
    for label, fn in [
        ("ingest bsds500", lambda: stages.stage_ingest(str(train_p), str(work / "bsds"))),
        ("ingest kodak", lambda: stages.stage_ingest(str(eval_p), str(work / "kodak"))),
        ("degrade", lambda: stages.stage_degrade(str(train_p), str(work / "bsds"), str(work / "shards"))),
        ("train", lambda: stages.stage_train(str(train_p), str(work / "shards"), str(work / "train"))),
        ("evaluate", lambda: stages.stage_evaluate(str(eval_p), str(work / "train/checkpoint"),
                                                    str(work / "kodak"), str(work / "eval"))),
    ]:
        start = time.perf_counter()
        result = fn()
        timings[label] = round(time.perf_counter() - start, 1)
    print(json.dumps({"seconds": timings, "steps": args.steps, "batch_size": args.batch_size}, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "synthetic"} | {
        "synthetic": {k: v for k, v in result["synthetic"].items() if k != "per_distortion"}}, indent=1))


if __name__ == "__main__":
    main()
