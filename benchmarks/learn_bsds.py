"""Does it learn? Train from scratch on BSDS500, evaluate on Kodak + CLIVE-dev.

Issue 5's learning proof: pristine photos from ../shared/data/bsds500 (all 500 as training
images), the held-out synthetic ranking on the 24 Kodak photos (all 24 types x 5 levels), and
SRCC/PLCC on the 250 CLIVE images of clive-dev. Prints the figures, and the wall and CPU time
(this process and its finished children: degrade and loader workers) of each stage. Usage:

    python benchmarks/learn_bsds.py --work /tmp/learn                       # the defaults below
    python benchmarks/learn_bsds.py --work /tmp/learn --set train.lr=0.003 --set train.steps=800
    python benchmarks/learn_bsds.py --work /tmp/learn --run NAME --evaluate-only   # re-score a finished run

Ingest and degrade reuse what --work already holds for the same settings (degrade resumes its
own plan and skips finished shards), so several training settings share one set of shards. Runs
started side by side on one --work take turns at ingest and degrade (a lock file in --work).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from filelock import FileLock
from timing import timed_with_children

from qualiclip.datasets import check_datasets
from qualiclip.errors import QualiclipError
from qualiclip.identity import params_hash
from qualiclip.pipeline import stages
from qualiclip.pipeline.params import read_params

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def params(sources: list[str], split: str) -> dict:
    """The benchmark's settings; ``--set`` overrides any of them."""
    return {
        "model": {"name": "qualiclip-tiny-rn", "pretrained": None},
        "tracking": {"backend": "none"},
        "ingest": {"sources": sources, "min_size": 224, "val_fraction": 0.0},
        "degrade": {"variants": 4, "samples_per_shard": 64, "workers": 2, "crop": 224},  # 64: as measured
        "train": {"steps": 1200, "batch_size": 4, "num_workers": 1, "log_every": 50, "checkpoint_every": 0},
        "evaluate": {
            "split": split,
            "crop": 224,
            "baseline": True,
            "datasets": [
                {
                    "name": "csv",
                    "root": str(SHARED / "clive-dev"),
                    "labels": "labels.csv",
                    "image_dir": "images",
                    "mos_range": [0, 100],
                    "lower_is_better": False,
                    "label": "clive_dev",
                }
            ],
        },
    }


def override(p: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to the params dict."""
    key, _, value = assignment.partition("=")
    *path, last = key.split(".")
    node = p
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def data_dirs(work: Path, train_cfgs: dict, eval_cfgs: dict) -> tuple[Path, Path, Path]:
    """BSDS500 ingest, Kodak ingest and shard folders, each named by the hash of the settings that
    make it, so runs of other training settings share them. An ingest is reused once finished
    (its summary.json is written last, atomically); degrade resumes a folder of its own plan."""
    bsds, kodak, degrade = train_cfgs["ingest"], eval_cfgs["ingest"], train_cfgs["degrade"]
    return (
        work / f"ingest-{params_hash(bsds)}",
        work / f"ingest-{params_hash(kodak)}",
        work / f"shards-{params_hash(bsds, degrade)}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/qualiclip-learn")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--run", default="run", help="subfolder of --work for this setting's train/eval outputs")
    ap.add_argument(
        "--model-config",
        type=Path,
        action="append",
        default=[],
        help="an extra open_clip model config JSON (its file name is the model name for model.name)",
    )
    ap.add_argument("--table", action="store_true", help="print a table of the finished runs under --work and exit")
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-evaluate the finished run --run (its saved settings) and keep its other timings",
    )
    args = ap.parse_args()
    if args.table:
        return table(Path(args.work))
    if args.model_config:
        import open_clip

        for path in args.model_config:
            open_clip.add_model_config(path)
    for name in ("bsds500", "kodak", "clive-dev"):
        if not (SHARED / name).is_dir():
            raise SystemExit(f"{SHARED / name} is absent: this benchmark needs ../shared/data")
    work = Path(args.work)
    run = work / args.run
    run.mkdir(parents=True, exist_ok=True)
    train_p, eval_p = run / "params_train.yaml", run / "params_eval.yaml"
    if args.evaluate_only and not (run / "learn_summary.json").exists():
        raise SystemExit(f"{run} holds no finished run (learn_summary.json) to re-evaluate")
    previous = json.loads((run / "learn_summary.json").read_text()) if args.evaluate_only else None
    settings = previous["set"] if previous is not None else args.set
    if previous is None:
        train_params = params([str(SHARED / "bsds500" / "images")], "train")
        eval_params = params([str(SHARED / "kodak" / "images")], "train")
        for a in args.set:
            override(train_params, a)
            override(eval_params, a)
        train_p.write_text(yaml.safe_dump(train_params))
        eval_p.write_text(yaml.safe_dump(eval_params))
    else:
        train_params, eval_params = yaml.safe_load(train_p.read_text()), yaml.safe_load(eval_p.read_text())
    # both params files checked whole, as each stage will, and the datasets, before hours of work
    train_cfgs = read_params(train_p, "ingest", "degrade", "train", "model", "evaluate", "tracking")
    eval_cfgs = read_params(eval_p, "ingest", "evaluate", "tracking")
    bsds, kodak, shards = data_dirs(work, train_cfgs, eval_cfgs)
    check_datasets(eval_cfgs["evaluate"])
    data_steps = [  # (label, folder whose summary.json means done, stage)
        ("ingest bsds500", bsds, lambda: stages.stage_ingest(str(train_p), str(bsds))),
        ("ingest kodak", kodak, lambda: stages.stage_ingest(str(eval_p), str(kodak))),
        ("degrade", None, lambda: stages.stage_degrade(str(train_p), str(bsds), str(shards))),
    ]
    timings = dict(previous["seconds"]) if previous is not None else {}

    def timed(label, fn):
        timings[label], out = timed_with_children(fn)
        return out

    if previous is None:
        with FileLock(str(work / ".data.lock")):  # two runs writing one ingest or shard folder would race
            for label, done_dir, fn in data_steps:
                if done_dir is not None and (done_dir / "summary.json").exists():
                    timings[label] = "reused"
                else:
                    timed(label, fn)
        timed("train", lambda: stages.stage_train(str(train_p), str(shards), str(run / "train")))
    result = timed(
        "evaluate",
        lambda: stages.stage_evaluate(str(eval_p), str(run / "train/checkpoint"), str(kodak), str(run / "eval")),
    )
    summary = {
        "set": settings,
        "seconds": timings,
        "train": train_params["train"],
        "model": train_params["model"],
        "degrade": train_params["degrade"],
        "metrics": {k: v for k, v in result.items() if k != "synthetic"}
        | {"synthetic": {k: v for k, v in result["synthetic"].items() if k != "per_distortion"}},
    }
    (run / "learn_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def table(work: Path) -> None:
    """A Markdown table of every finished run under ``work``."""
    print(
        "| run | settings | train CPU s | Kodak SRCC within (image, type) | Kodak SRCC pooled | CLIVE-dev SRCC | CLIVE-dev PLCC |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in sorted(work.glob("*/learn_summary.json"), key=lambda p: p.stat().st_mtime):
        s = json.loads(path.read_text())
        syn, clive = s["metrics"]["synthetic"], s["metrics"].get("clive_dev", {})
        print(
            f"| {path.parent.name} | {' '.join(s['set']) or 'defaults'} | {s['seconds']['train']['cpu_s']:.0f} | "
            f"{syn['srcc_within']:.3f} | {syn['srcc']:.3f} | {clive.get('srcc', float('nan')):.3f} | "
            f"{clive.get('plcc', float('nan')):.3f} |"
        )


if __name__ == "__main__":
    try:
        main()
    except QualiclipError as exc:  # a bad --set value or params file: one line, as the CLI prints it
        raise SystemExit(f"learn_bsds: error: {exc}") from None
