"""The ``qualiclip`` command line: the pipeline stages (as DVC calls them) and user tools."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError


def cmd_stage(args) -> None:
    from . import stages

    paths = {k: getattr(args, k) for k in ("ingest", "shards", "model", "out") if getattr(args, k, None)}
    getattr(stages, f"stage_{args.command}")(args.params, **paths)


# ---------------------------------------------------------------------------------------------
# User tools


def cmd_score(args) -> None:
    from .score_cli import run_score

    run_score(args)


def cmd_distortions(args) -> None:
    from .distortions import GROUPS, save_contact_sheet

    if args.list or not args.grid:
        for group, names in GROUPS.items():
            for name in names:
                print(f"{name}\t{group}")
    if args.grid:
        source = args.image
        if source is None:
            import skimage.data

            source = skimage.data.astronaut()
        out = save_contact_sheet(source, Path(args.grid), names=args.types or None, seed=args.seed)
        print(f"wrote {out}")


def cmd_explain(args) -> None:
    from .explain import run_explain

    run_explain(args)


def cmd_promote(args) -> None:
    from .promotion import run_promote

    run_promote(args)


def cmd_export_official(args) -> None:
    from .checkpoint import export_official, load_checkpoint

    out = export_official(load_checkpoint(args.model), Path(args.out))
    print(f"wrote {out} (official QualiCLIP format)")


def cmd_export_onnx(args) -> None:
    from .onnx_export import export_onnx
    from .scoring import load_scorer

    out = export_onnx(load_scorer(Path(args.model)), Path(args.out))
    print(f"wrote {out} (uint8 (N, H, W, 3) RGB in, score out; docs/evaluation.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qualiclip", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name, fn, *paths):
        sp = sub.add_parser(name, help=f"the {name} stage (as dvc.yaml runs it)")
        sp.add_argument("--params", default="params.yaml")
        for flag, help_ in paths:
            sp.add_argument(flag, required=True, help=help_)
        sp.set_defaults(fn=fn)

    stage("ingest", cmd_stage, ("--out", "output folder"))
    stage("degrade", cmd_stage, ("--ingest", "ingest output folder"), ("--out", "shard folder"))
    stage("train", cmd_stage, ("--shards", "shard folder"), ("--out", "output folder (checkpoint/, train_log.csv)"))
    stage("evaluate", cmd_stage, ("--model", "checkpoint folder"), ("--ingest", "ingest output folder"),
          ("--out", "output folder"))

    sp = sub.add_parser("score", help="score images, folders or list files to CSV/JSON")
    from .score_cli import add_score_args

    add_score_args(sp)
    sp.set_defaults(fn=cmd_score)

    sp = sub.add_parser("distortions", help="list the distortion types or render a contact sheet")
    sp.add_argument("--list", action="store_true", help="print 'name<TAB>group', one per line")
    sp.add_argument("--grid", metavar="OUT.png", help="write a contact sheet (rows = types, columns = levels)")
    sp.add_argument("--image", help="source image for --grid (default: scikit-image's astronaut)")
    sp.add_argument("--types", nargs="*", help="only these types")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_distortions)

    sp = sub.add_parser("explain", help="quality map: per-patch scores as a heat map over the image")
    from .explain import add_explain_args

    add_explain_args(sp)
    sp.set_defaults(fn=cmd_explain)

    sp = sub.add_parser("promote", help="tag the new model version with its evaluation; move the champion alias if better")
    from .promotion import add_promote_args

    add_promote_args(sp)
    sp.set_defaults(fn=cmd_promote)

    sp = sub.add_parser("export-official", help="write a checkpoint in the official QualiCLIP .pth format")
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_export_official)

    sp = sub.add_parser("export-onnx", help="write the scorer as one ONNX graph (any image size; needs the onnx extra)")
    sp.add_argument("--model", required=True, help="checkpoint folder or official .pth")
    sp.add_argument("--out", required=True, help="output .onnx file")
    sp.set_defaults(fn=cmd_export_onnx)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if _is_user_error(exc):
            print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


def _is_user_error(exc: Exception) -> bool:
    """Errors whose message already names the fix: print them, no traceback."""
    names = {"ModelLoadError", "ShardError", "DegradeError", "IngestError", "DatasetError",
             "UnknownDistortionError", "ImageReadError", "ScoreError", "ScoringError", "ExplainError",
             "EvaluateError", "PromotionError", "TrainError", "OnnxExportError"}
    return type(exc).__name__ in names


if __name__ == "__main__":
    sys.exit(main())
