"""The stage entries exactly as dvc.yaml calls them: bad arguments give clear errors, exit 2."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import CLEAN_ENV, bin_path, make_photos, tiny_params


def qualiclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **CLEAN_ENV}
    return subprocess.run([bin_path("qualiclip"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def project(tmp_path) -> Path:
    photos = make_photos(tmp_path / "photos", n=3)
    params = tiny_params([str(photos)], tracking__backend="none")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_unknown_params_key_is_named(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["min_sise"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = qualiclip("ingest", "--params", "params.yaml", "--out", "data/ingest", cwd=project)
    assert proc.returncode == 2
    assert "unknown key 'min_sise' in params section 'ingest' — did you mean 'min_size'?" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["degrade", "--ingest", "nowhere", "--out", "data/shards"], "run the ingest stage first"),
        (["train", "--shards", "nowhere", "--out", "outputs/train"], "run the degrade stage first"),
        (["evaluate", "--model", "nowhere", "--ingest", "nowhere", "--out", "o"], "run the train stage first"),
        (["ingest", "--params", "missing.yaml", "--out", "data/ingest"], "params file missing.yaml not found"),
    ],
)
@pytest.mark.slow
def test_missing_upstream_output_names_the_stage_to_run(project, args, message):
    proc = qualiclip(*args, cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_required_argument_is_an_argparse_error(project):
    proc = qualiclip("degrade", "--out", "x", cwd=project)
    assert proc.returncode == 2
    assert "--ingest" in proc.stderr


def test_distortions_list_prints_every_type_with_its_group(project):
    proc = qualiclip("distortions", "--list", cwd=project)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert len(rows) == 24 and all(len(r) == 2 for r in rows)
    assert ["gaussian_blur", "blur"] in rows


def test_module_entry_is_the_same_command(project):
    """``python -m qualiclip.pipeline.cli`` (what torchrun runs) is the ``qualiclip`` command."""
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "qualiclip.pipeline.cli", "distortions", "--list"],
        cwd=project,
        env={**os.environ, **CLEAN_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == qualiclip("distortions", "--list", cwd=project).stdout


def test_stage_entries_run_in_order_as_dvc_calls_them(project):
    for args in (
        ["ingest", "--params", "params.yaml", "--out", "data/ingest"],
        ["degrade", "--params", "params.yaml", "--ingest", "data/ingest", "--out", "data/shards"],
    ):
        proc = qualiclip(*args, cwd=project)
        assert proc.returncode == 0, proc.stderr
    assert (project / "data/shards/index.json").is_file()
    assert "samples in" in proc.stdout


def test_every_user_error_is_one_line_without_traceback(monkeypatch, capsys):
    """The CLI recognises user errors by their base class, so a new error type needs no registration."""
    from qualiclip.errors import QualiclipError
    from qualiclip.pipeline import cli

    class BrandNewError(QualiclipError):
        pass

    def fail(args):
        raise BrandNewError("shards.tar is torn — rerun the degrade stage")

    monkeypatch.setattr(cli, "cmd_distortions", fail)
    assert cli.main(["distortions", "--list"]) == 2
    assert capsys.readouterr().err == "qualiclip distortions: error: shards.tar is torn — rerun the degrade stage\n"


@pytest.mark.slow
def test_evaluate_without_held_out_images_names_the_fix(project):
    """An ingest output with no 'val' image is a user error (one line, exit 2), not a traceback."""
    from qualiclip.checkpoint import save_checkpoint
    from qualiclip.model import ModelConfig, create_model

    save_checkpoint(create_model(ModelConfig()), project / "checkpoint")
    (project / "ingest").mkdir()
    (project / "ingest" / "manifest.csv").write_text("id,split\nab12,train\n")
    proc = qualiclip("evaluate", "--model", "checkpoint", "--ingest", "ingest", "--out", "eval", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "no 'val' images in ingest/manifest.csv — ingest more photos or lower ingest.val_fraction" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_prints_the_package_version(capsys):
    from qualiclip import __version__
    from qualiclip.pipeline.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"qualiclip {__version__}\n"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("score", ["--device DEVICE", "(default: auto)", "(default: 8)", "(default: 89478485)"]),
        ("train", ["(default: params.yaml)"]),
        ("explain", ["(default: 224)", "(default: 112)"]),
        ("distortions", ["(default: 0)"]),
    ],
)
def test_help_shows_the_defaults(command, shown, capsys):
    from qualiclip.pipeline.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(s in text for s in shown), text
    assert "(default: None)" not in text and "(default: False)" not in text


def with_shards(project: Path) -> dict:
    """Ingest and degrade the project's photos (data/ingest, data/shards); its params as a dict."""
    from qualiclip.config import build_config
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.ingest import IngestConfig, run_ingest

    params = yaml.safe_load((project / "params.yaml").read_text())
    run_ingest(
        IngestConfig(sources=(str(project / "photos"),), min_size=64, val_fraction=0.0, workers=1),
        project / "data/ingest",
        progress=False,
    )
    run_degrade(
        build_config(DegradeConfig, params["degrade"], where="degrade"),
        project / "data/ingest",
        project / "data/shards",
        progress=False,
    )
    return params


@pytest.mark.slow
def test_train_fails_before_training_when_an_evaluate_dataset_is_broken(project):
    params = with_shards(project)
    rated = make_photos(project / "rated", n=3)
    (rated / "labels.csv").write_text("image,mos\nphoto_00.png,3.0\nphoto_01.png,4.0\n")  # photo_02.png: no label
    params["evaluate"]["datasets"] = [
        {"name": "csv", "root": str(rated), "mos_range": [1, 5], "lower_is_better": False}
    ]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = qualiclip("train", "--shards", "data/shards", "--out", "outputs/train", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "dataset 'csv'" in proc.stderr and "image without a label" in proc.stderr and "photo_02.png" in proc.stderr
    assert "Traceback" not in proc.stderr and not (project / "outputs/train").exists()


# ---------------------------------------------------------------------------------------------
# Issue 19: a bad params file fails every stage before any work, as one line


def _mutate(text: str, case: str) -> str:
    """The project's params.yaml (tiny_params, safe_dump layout) broken one way."""
    params = yaml.safe_load(text)
    edits = {
        "misspelt section": lambda p: p.update(trian=p.pop("train")),
        "missing section": lambda p: p.pop("ingest"),
        "section as a list": lambda p: p.update(ingest=["min_size", 64]),
        "steps 0": lambda p: p["train"].update(steps=0),
        "negative steps": lambda p: p["train"].update(steps=-3),
        "negative warmup": lambda p: p["train"].update(warmup_steps=-1),
        "negative checkpoint_every": lambda p: p["train"].update(checkpoint_every=-1),
        "batch_size 0": lambda p: p["train"].update(batch_size=0),
        "negative lr": lambda p: p["train"].update(lr=-0.01),
        "num_workers -1": lambda p: p["train"].update(num_workers=-1),
        "device banana": lambda p: p["train"].update(device="banana"),
        "evaluate typo": lambda p: p["evaluate"].update(distortions=["gausian_blur"]),
    }
    if case == "empty file":
        return ""
    if case == "duplicate key":
        return text.replace("train:\n", "train:\n  steps: 100\n", 1)
    if case == "yaml syntax":
        return text.replace("train:\n", "train:\n  steps: [3\n", 1)
    edits[case](params)
    return yaml.safe_dump(params)


BAD_PARAMS = {
    "misspelt section": "unknown section 'trian' — did you mean 'train'?",
    "missing section": "params.yaml has no 'ingest:' section — add it ('ingest: {}' takes every default)",
    "empty file": "params.yaml is empty",
    "duplicate key": "key 'steps' is written twice in one mapping",
    "section as a list": "params section 'ingest' must be a mapping of keys",
    "yaml syntax": "params.yaml, line",
    "steps 0": "train.steps must be an integer in [1, 1000000000], got 0",
    "negative steps": "train.steps must be an integer in [1, 1000000000], got -3",
    "negative warmup": "train.warmup_steps must be an integer in [0, 1000000000], got -1",
    "negative checkpoint_every": "train.checkpoint_every must be an integer in [0, 1000000000], got -1",
    "batch_size 0": "train.batch_size must be an integer in [1, 65536], got 0",
    "negative lr": "train.lr must be a number in (0, 10], got -0.01",
    "num_workers -1": "train.num_workers must be an integer in [0, 256], got -1",
    "device banana": "train.device must be auto, cpu, cuda, cuda:N or mps, got 'banana'",
    "evaluate typo": "evaluate.distortions[0]: unknown distortion 'gausian_blur' — did you mean 'gaussian_blur'?",
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_a_bad_params_file_fails_the_first_stage_before_any_work(project, monkeypatch, case):
    """The ingest stage reads only ``ingest:``, yet a broken ``train:`` or ``evaluate:`` fails it at
    once, with the one user-error class, one line naming the file and key: nothing is written."""
    from qualiclip.errors import QualiclipError
    from qualiclip.pipeline import stages

    params = project / "params.yaml"
    params.write_text(_mutate(params.read_text(), case))
    monkeypatch.chdir(project)
    with pytest.raises(QualiclipError) as info:
        stages.stage_ingest("params.yaml", "data/ingest")
    message = str(info.value)
    assert BAD_PARAMS[case] in message and message.startswith("params.yaml") and "\n" not in message
    assert not (project / "data").exists()


@pytest.mark.parametrize("case", ["yaml syntax", "section as a list", "device banana"])
def test_a_bad_params_file_is_one_line_without_traceback(project, case):
    params = project / "params.yaml"
    params.write_text(_mutate(params.read_text(), case))
    proc = qualiclip("ingest", "--params", "params.yaml", "--out", "data/ingest", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("qualiclip ingest: error: params.yaml") and proc.stderr.count("\n") == 1
    assert BAD_PARAMS[case] in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_fails_before_training_when_evaluate_is_misconfigured(project):
    """evaluate: runs after an hour of training; its bad value must stop `train` at its start."""
    params = with_shards(project)
    params["evaluate"]["batch_size"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = qualiclip("train", "--shards", "data/shards", "--out", "outputs/train", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == "qualiclip train: error: params.yaml: evaluate.batch_size must be an integer in [1, 65536], got 0\n"
    )
    assert not (project / "outputs/train").exists()


# ---------------------------------------------------------------------------------------------
# A clean stop (issue 26): Ctrl-C or SIGTERM in any command is one line and exit 130 / 143


@pytest.mark.parametrize(
    ("command", "args", "how"),
    [
        ("ingest", ["--out", "o"], "nothing is kept: rerun the same command to start it again"),
        (
            "evaluate",
            ["--model", "m", "--ingest", "i", "--out", "o"],
            "nothing is kept: rerun the same command to start it again",
        ),
        (
            "train",
            ["--shards", "s", "--out", "o"],
            "no train state was saved yet (every train.checkpoint_every steps): a rerun starts at step 0",
        ),
    ],
)
@pytest.mark.parametrize(("signum", "code", "name"), [("SIGINT", 130, "Ctrl-C (SIGINT)"), ("SIGTERM", 143, "SIGTERM")])
def test_a_signal_during_a_stage_is_one_line_and_its_exit_code(
    tmp_path, monkeypatch, capsys, command, args, how, signum, code, name
):
    import signal

    from qualiclip.pipeline import cli, stages

    def interrupted(*_, **__):
        os.kill(os.getpid(), getattr(signal, signum))  # a real signal, delivered to the running stage
        raise AssertionError("the signal did not stop the stage")

    monkeypatch.setattr(stages, f"stage_{command}", interrupted)
    monkeypatch.chdir(tmp_path)
    session = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        assert cli.main([command, *args]) == code
        assert capsys.readouterr().err == f"qualiclip {command}: stopped by {name}; {how}\n"
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers given back
    finally:
        signal.signal(signal.SIGINT, session)


def test_ctrl_c_while_scoring_names_the_output_it_did_not_write(tmp_path, monkeypatch, capsys):
    from qualiclip.pipeline import cli, score_cli

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_cli, "run_score", interrupted)
    assert cli.main(["score", "a.png", "--out", str(tmp_path / "s.csv")]) == 130
    assert capsys.readouterr().err == (
        f"qualiclip score: stopped by Ctrl-C (SIGINT); no {tmp_path / 's.csv'} was written: rerun the same command\n"
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--batch-size", "0"),
        ("--batch-size", "1000000000"),
        ("--batch-size", "nan"),
        ("--threads", "-1"),
        ("--threads", "100000"),
        ("--max-pixels", "0"),
        ("--max-pixels", "1e30"),
        ("--max-memory-gb", "inf"),
    ],
)
def test_numeric_score_options_outside_their_range_are_usage_errors(tmp_path, capsys, option, value):
    from qualiclip.pipeline import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["score", "a.png", "--out", str(tmp_path / "s.csv"), option, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {option}: " in err and "Traceback" not in err


def test_a_path_option_no_file_can_have_is_one_line_not_an_os_error(tmp_path, capsys):
    from qualiclip.pipeline import cli

    long_name = str(tmp_path / ("x" * 300 + ".csv"))
    assert cli.main(["ingest", "--params", long_name, "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("qualiclip ingest: error: the params path ") and "longer than the 255 a file name may be" in err
    )
    assert cli.main(["score", "a.png", "--out", long_name]) == 2
    assert "the out path" in capsys.readouterr().err
