"""The ``qualiclip`` command line: the pipeline stages (as DVC calls them) and user tools.

Argparse lives here only: each command turns its arguments into typed values and calls one
function. The modules behind each command are imported when it runs: ``score``, ``explain``,
``promote``, ``export-official``, ``export-onnx``, ``import-pyiqa`` and ``export-pyiqa`` pull in torch and open_clip (seconds), which
``--help``, ``ingest``, ``degrade`` and ``distortions`` do not need; and a stage process loads only
the code its DVC stage depends on (see `qualiclip.pipeline.stages`).

Exit status: 0 done; 3 ``promote`` decided not to promote (refused by the gate, or the champion
kept: the reason is printed; not an error); 2 a user error (`QualiclipError`, one line naming the fix) or a usage error
(every numeric option has a range: `bounded`); 130 after Ctrl-C and 143 after SIGTERM, each a
clean stop with one line saying what is kept and how a rerun resumes (`stop_line`), no traceback.

``python -m qualiclip.pipeline.cli`` is the same command (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from .. import __version__
from ..errors import QualiclipError
from ..imageio import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT, BadPathError, check_path_text
from ..schema import MAX_BATCH, MAX_SIDE, MAX_THREADS
from . import stages

# Exit status of a command stopped by a signal: the shell's 128 + the signal's number (SIGINT 130, SIGTERM 143)
EXIT_STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}
EXIT_NOT_PROMOTED = 3  # `qualiclip promote` decided, and the alias stays where it was


def cmd_stage(args: argparse.Namespace) -> None:
    paths = {k: getattr(args, k) for k in ("ingest", "shards", "model", "out", "eval_out") if hasattr(args, k)}
    getattr(stages, f"stage_{args.command}")(args.params, **paths)


# ---------------------------------------------------------------------------------------------
# User tools


def model_options(args: argparse.Namespace):
    """The shared model options of ``score`` and ``explain`` as their typed value."""
    from .score_cli import ModelOptions  # torch and open_clip: see the module docstring

    return ModelOptions(
        model=args.model,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        max_memory_gb=args.max_memory_gb,
    )


def cmd_score(args: argparse.Namespace) -> None:
    from .score_cli import run_score

    run_score(
        args.paths,
        Path(args.out),
        model_options(args),
        batch_size=args.batch_size,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
    )


def cmd_explain(args: argparse.Namespace) -> None:
    from .explain_cli import run_explain

    run_explain(
        args.image,
        Path(args.out),
        model_options(args),
        patch=args.patch,
        stride=args.stride,
        batch_size=args.batch_size,
        csv_out=Path(args.csv) if args.csv else None,
        max_pixels=args.max_pixels,
    )


def cmd_distortions(args: argparse.Namespace) -> None:
    import skimage.data

    from ..distortions import GROUPS, save_contact_sheet

    if args.list or not args.grid:
        for group, names in GROUPS.items():
            for name in names:
                print(f"{name}\t{group}")
    if args.grid:
        source = args.image if args.image is not None else skimage.data.astronaut()
        out = save_contact_sheet(source, Path(args.grid), names=args.types or None, seed=args.seed)
        print(f"wrote {out}")


def cmd_promote(args: argparse.Namespace) -> int:
    """Exit 0 when promoted (or already the champion), `EXIT_NOT_PROMOTED` when refused or kept."""
    from .promotion import NOT_PROMOTED, promote_project

    d = promote_project(
        args.project,
        args.params,
        checkpoint=args.model,
        metrics_file=args.metrics,
        shards=args.shards,
        dry_run=args.dry_run,
        plus=args.plus,
    )
    print(json.dumps(d.as_dict(), indent=2) if args.json else f"promote: {d.reason}")
    return EXIT_NOT_PROMOTED if d.outcome in NOT_PROMOTED else 0


def cmd_export_official(args: argparse.Namespace) -> None:
    from ..checkpoint import export_official, load_checkpoint

    out = export_official(load_checkpoint(args.model), Path(args.out))
    print(f"wrote {out} (official QualiCLIP format)")


def cmd_import_pyiqa(args: argparse.Namespace) -> None:
    from ..checkpoint import load_checkpoint
    from ..plus import import_pyiqa

    out = import_pyiqa(load_checkpoint(args.model), Path(args.weights), Path(args.out))
    print(f"wrote {out} (QualiCLIP+ with pyiqa's prompts; score with --model {out})")


def cmd_export_pyiqa(args: argparse.Namespace) -> None:
    from ..checkpoint import load_checkpoint
    from ..plus import LEARNER_FILE, export_pyiqa, read_learner

    plus_dir = Path(args.plus)
    learner = read_learner(plus_dir / LEARNER_FILE, load_checkpoint(plus_dir / "checkpoint"))
    out = export_pyiqa(learner, Path(args.out))
    print(f"wrote {out} (pyiqa QualiCLIP+ prompt-learner weights, key 'params')")


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from ..inference import load_scorer
    from ..onnx_export import export_onnx

    out = export_onnx(load_scorer(Path(args.model)), Path(args.out))
    print(f"wrote {out} (uint8 (N, H, W, 3) RGB in, score out; docs/evaluation.md)")


# ---------------------------------------------------------------------------------------------
# The parser


def bounded(kind: type, low: float, high: float):
    """An argparse ``type`` for a number of ``kind`` (int or float) from ``low`` to ``high``, both
    included: anything else (NaN, inf, 1e400, text) is argparse's one-line usage error, exit 2."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g} to {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default; not for switches and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or action.required:
            return action.help
        return super()._get_help_string(action)


def add_stage_parsers(sub) -> None:
    def stage(name, *paths):
        sp = sub.add_parser(name, help=f"the {name} stage (as dvc.yaml runs it)")
        sp.add_argument("--params", default="params.yaml", help="the parameters file")
        for flag, help_, *optional in paths:
            sp.add_argument(flag, required=not optional, help=help_)
        sp.set_defaults(fn=cmd_stage)

    stage("ingest", ("--out", "output folder"))
    stage("degrade", ("--ingest", "ingest output folder"), ("--out", "shard folder"))
    stage(
        "train",
        ("--shards", "shard folder (train.source: shards)", "optional"),
        ("--ingest", "ingest output folder (train.source: on_the_fly)", "optional"),
        ("--out", "output folder (checkpoint/, train_log.csv)"),
    )
    stage(
        "evaluate", ("--model", "checkpoint folder"), ("--ingest", "ingest output folder"), ("--out", "output folder")
    )
    stage(
        "plus",
        ("--model", "checkpoint folder it starts from"),
        ("--out", "output folder (checkpoint/, splits.json)"),
        ("--eval-out", "evaluation folder (metrics.json, per-image scores)"),
    )


def add_model_args(sp: argparse.ArgumentParser) -> None:
    """Options shared by ``score`` and ``explain``: which model, where, how precise, how large."""
    sp.add_argument(
        "--model",
        default=None,
        help="checkpoint folder, official .pth file, or MLflow URI (models:/qualiclip@champion, "
        "runs:/ID/qualiclip-RN50); default: the checkpoint dvc.yaml's evaluate stage evaluates",
    )
    sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    sp.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="bf16/fp16 autocast: faster (fp16 GPU only); a trained model's scores move by up to "
        "0.072 (docs/evaluation.md)",
    )
    sp.add_argument(
        "--threads",
        type=bounded(int, 0, MAX_THREADS),
        default=0,
        help=f"CPU threads for torch, 0 to {MAX_THREADS} (0: torch's default)",
    )
    sp.add_argument(
        "--max-pixels",
        type=bounded(int, 1, MAX_PIXELS_LIMIT),
        default=DEFAULT_MAX_PIXELS,
        help=f"decompression-bomb guard, 1 to {MAX_PIXELS_LIMIT}",
    )
    sp.add_argument(
        "--max-memory-gb",
        type=bounded(float, 0.001, 1e6),
        default=None,
        help="memory budget for scoring one image, estimated before it is scored; larger images are "
        "refused, never tiled; from 0.001 to the memory of the scoring device "
        "(default: half the memory of the scoring device)",
    )


def add_score_parser(sub) -> None:
    sp = sub.add_parser("score", help="score images, folders or list files to CSV/JSON")
    sp.add_argument(
        "paths",
        nargs="+",
        help="image files, folders (recursive), or .txt/.lst/.list files (one path per line, "
        "relative paths taken from the list file's folder, '#' comments)",
    )
    sp.add_argument("--out", required=True, help="scores.csv or scores.json")
    add_model_args(sp)
    sp.add_argument(
        "--batch-size",
        type=bounded(int, 1, MAX_BATCH),
        default=8,
        help=f"images of equal size scored together, 1 to {MAX_BATCH} (capped at 0.8 MP per batch to bound memory)",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    sp.set_defaults(fn=cmd_score)


def add_explain_parser(sub) -> None:
    sp = sub.add_parser("explain", help="quality map: per-patch scores as a heat map over the image")
    sp.add_argument("image", help="the image to explain")
    sp.add_argument("--out", required=True, help="the heat map, e.g. map.png")
    add_model_args(sp)
    sp.add_argument(
        "--patch",
        type=bounded(int, 16, MAX_SIDE),
        default=224,
        help=f"window side in pixels, 16 to {MAX_SIDE} (224: CLIP's training size)",
    )
    sp.add_argument(
        "--stride",
        type=bounded(int, 1, MAX_SIDE),
        default=112,
        help=f"window step in pixels, 1 to {MAX_SIDE} (smaller: finer map, slower)",
    )
    sp.add_argument(
        "--batch-size", type=bounded(int, 1, MAX_BATCH), default=8, help=f"windows scored together, 1 to {MAX_BATCH}"
    )
    sp.add_argument("--csv", help="also write the patch scores (y, x, size, score) to this CSV")
    sp.set_defaults(fn=cmd_explain)


def add_tool_parsers(sub) -> None:
    sp = sub.add_parser("distortions", help="list the distortion types or render a contact sheet")
    sp.add_argument("--list", action="store_true", help="print 'name<TAB>group', one per line")
    sp.add_argument("--grid", metavar="OUT.png", help="write a contact sheet (rows = types, columns = levels)")
    sp.add_argument("--image", help="source image for --grid (default: scikit-image's astronaut)")
    sp.add_argument("--types", nargs="*", help="only these types")
    sp.add_argument(
        "--seed",
        type=bounded(int, 0, 2**32 - 1),
        default=0,
        help="seed of the random parts of each distortion, 0 to 2^32-1",
    )
    sp.set_defaults(fn=cmd_distortions)

    sp = sub.add_parser(
        "promote",
        help="re-score the champion on this run's images; move the alias only to a surely better model "
        "(exit 3: not promoted)",
    )
    sp.add_argument("--params", default="params.yaml", help="params file, relative to --project")
    sp.add_argument(
        "--project", default=".", help="project folder (holds dvc.yaml, dvc.lock and the default mlflow.db)"
    )
    sp.add_argument(
        "--plus",
        action="store_true",
        help="promote the QualiCLIP+ model of the plus stage (<tracking.registered_model>-plus, its own champion; "
        "metric: promotion.plus_metric) instead of the QualiCLIP model",
    )
    sp.add_argument("--model", help="checkpoint folder the train (--plus: plus) stage wrote (default: from dvc.yaml)")
    sp.add_argument("--metrics", help="metrics.json the evaluate (--plus: plus) stage wrote (default: from dvc.yaml)")
    sp.add_argument("--shards", help="shard folder, to read its hash from dvc.lock (default: from dvc.yaml)")
    sp.add_argument("--dry-run", action="store_true", help="decide and print, change nothing in the registry")
    sp.add_argument("--json", action="store_true", help="print the decision as JSON")
    sp.set_defaults(fn=cmd_promote)

    sp = sub.add_parser("export-official", help="write a checkpoint in the official QualiCLIP .pth format")
    sp.add_argument("--model", required=True, help="checkpoint folder")
    sp.add_argument("--out", required=True, help="the .pth file to write")
    sp.set_defaults(fn=cmd_export_official)

    sp = sub.add_parser("import-pyiqa", help="a QualiCLIP+ checkpoint from pyiqa's QualiCLIP+_*.pth prompt weights")
    sp.add_argument("--model", required=True, help="QualiCLIP checkpoint folder or official .pth the prompts run on")
    sp.add_argument("--weights", required=True, help="pyiqa's QualiCLIP+_*.pth file")
    sp.add_argument("--out", required=True, help="output folder (checkpoint/, prompt_learner.safetensors)")
    sp.set_defaults(fn=cmd_import_pyiqa)

    sp = sub.add_parser("export-pyiqa", help="write a QualiCLIP+ result as pyiqa's QualiCLIP+_*.pth prompt weights")
    sp.add_argument("--plus", required=True, help="the plus stage's output folder (e.g. outputs/plus)")
    sp.add_argument("--out", required=True, help="the .pth file to write")
    sp.set_defaults(fn=cmd_export_pyiqa)

    sp = sub.add_parser("export-onnx", help="write the scorer as one ONNX graph (any image size; needs the onnx extra)")
    sp.add_argument("--model", required=True, help="checkpoint folder or official .pth")
    sp.add_argument("--out", required=True, help="output .onnx file")
    sp.set_defaults(fn=cmd_export_onnx)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qualiclip", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"qualiclip {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    add_stage_parsers(sub)
    add_score_parser(sub)
    add_explain_parser(sub)
    add_tool_parsers(sub)
    for command in sub.choices.values():  # one formatter for every command, set where they are all known
        command.formatter_class = HelpFormatter
    return p


# ---------------------------------------------------------------------------------------------
# A clean stop on Ctrl-C (SIGINT) and SIGTERM


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like Ctrl-C's KeyboardInterrupt: context managers
    close (MLflow marks the run KILLED, the degrade lock is released) on the way out."""

    signum = signal.SIGTERM


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped()


def stop_line(args: argparse.Namespace, signum: int) -> str:
    """One line: which signal stopped the command, what it keeps, and how a rerun resumes."""
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
    out = getattr(args, "out", None)
    if args.command == "train" and out is not None:
        how = _train_resumes(Path(out))
    elif args.command == "degrade":
        how = (
            f"the shards written so far are kept in {out}: rerun the same command to write the rest "
            "(the finished set is the same, byte for byte)"
        )
    elif args.command in ("ingest", "evaluate"):
        how = "nothing is kept: rerun the same command to start it again"
    elif args.command in ("score", "explain"):
        how = f"no {out} was written: rerun the same command"
    else:
        how = "rerun the same command"
    return f"qualiclip {args.command}: stopped by {name}; {how}"


def _train_resumes(out: Path) -> str:
    """Where a rerun of train resumes: the step of the train state in ``out``, or step 0."""
    from ..checkpoint import TRAIN_STATE, load_train_state  # torch: only once train has run

    try:
        state = load_train_state(out / TRAIN_STATE)
    except QualiclipError:  # unreadable: the rerun says so, with its fix
        state = None
    if not state:
        return "no train state was saved yet (every train.checkpoint_every steps): a rerun starts at step 0"
    step = int(state["step"])
    return (
        f"the train state of step {step} is kept in {out / TRAIN_STATE}: rerun the same command to resume "
        f"from step {step} (the steps after it are redone, with the same result)"
    )


# The options that name one path of the command (not the images `score` reads: each of those is its own item)
PATH_ARGS = ("params", "out", "ingest", "shards", "model", "csv", "image", "grid", "project", "metrics", "eval_out")


def check_path_args(args: argparse.Namespace) -> None:
    """Each path option checked before any work (`imageio.check_path_text`): a name the file system
    cannot take (too long, say) is then one line naming the option, not an OSError from deep inside."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and "://" not in value and ":/" not in value[:12]:  # s3://, models:/ are not paths
            try:
                check_path_text(value)
            except BadPathError as exc:
                raise QualiclipError(f"the {name} path {exc.path}: {exc.detail}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not sys.stderr.isatty():  # our bars switch off by themselves (tqdm disable=None); MLflow's do not
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handlers = _catch_stops()
    try:
        check_path_args(args)
        status = args.fn(args)
    except (QualiclipError, FileNotFoundError) as exc:  # the message already names the fix: no traceback
        print(f"qualiclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: a stop asked for, not a crash
        if handlers:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
        signum = getattr(exc, "signum", signal.SIGINT)
        print(stop_line(args, signum), file=sys.stderr)
        return EXIT_STOPPED[signum]
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return status or 0


def _catch_stops() -> dict:
    """SIGTERM raises `Stopped` from now on (Ctrl-C raises KeyboardInterrupt anyway); returns the
    handlers to restore. Only the main thread may set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {
        signal.SIGINT: signal.getsignal(signal.SIGINT),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stopped),
    }


if __name__ == "__main__":
    sys.exit(main())
