"""The train stage: outputs, tracking, BatchNorm modes, precision, and SIGKILL + resume = same weights."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLEAN_ENV, make_photos

from qualiclip.checkpoint import TRAIN_STATE, load_train_state, save_train_state
from qualiclip.config import ConfigError
from qualiclip.loader import LoaderStats
from qualiclip.model import ModelConfig
from qualiclip.tracking import Tracker
from qualiclip.train import (
    DistInfo,
    TrainConfig,
    TrainError,
    amp_dtype,
    build_trainer,
    lr_factor,
    optimize,
    run_train,
    shard_batches,
    train_state,
)

TINY_TRAIN = dict(steps=8, batch_size=3, num_workers=0, shuffle_buffer=4, log_every=1, warmup_steps=2, threads=1)


def build_shards(root: Path) -> Path:
    """Two tiny shards (4 samples each, 64 px crops) from 4 synthetic photos, via ingest + degrade."""
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.ingest import IngestConfig, run_ingest
    from qualiclip.sampling import SampleConfig

    make_photos(root / "photos", n=4, size=(80, 96))
    run_ingest(
        IngestConfig(sources=(str(root / "photos"),), min_size=64, val_fraction=0.0, workers=1),
        root / "ingest",
        progress=False,
    )
    cfg = DegradeConfig(
        variants=2,
        samples_per_shard=4,
        workers=1,
        sample=SampleConfig(crop=64, distortions=("gaussian_blur", "white_noise", "jpeg", "brighten")),
    )
    run_degrade(cfg, root / "ingest", root / "shards", progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("data"))


class RecordingTracker(Tracker):
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def random_batch(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 2, 5, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_resume_key_is_that_of_earlier_versions():
    """A train state written before the loss weights became `TrainConfig.loss` (same params) resumes."""
    import yaml

    from qualiclip.config import build_config
    from qualiclip.train import resume_key

    assert resume_key(TrainConfig(steps=200, checkpoint_every=0), ModelConfig(), 1) == "41f9c972af6f4cd4"
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    shipped = (
        build_config(TrainConfig, params["train"], where="train"),
        build_config(ModelConfig, params["model"], where="model"),
    )
    assert resume_key(*shipped, 1) == "f307d9b618c0d631"


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=10, warmup_steps=2)
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0) and lr_factor(10, cfg) == pytest.approx(0.0)
    assert lr_factor(6, TrainConfig(steps=10, warmup_steps=2, schedule="constant")) == 1.0


@pytest.mark.slow
def test_run_train_writes_outputs_and_tracks_every_term(shards, tmp_path):
    tracker = RecordingTracker()
    cfg = TrainConfig(**{**TINY_TRAIN, "steps": 3, "threads": 0})
    result = run_train(cfg, ModelConfig(), shards, tmp_path, tracker=tracker, progress=False, metadata={"x": 1})
    assert (
        result.steps == 3
        and result.corrupt_samples == 0
        and set(result.final) == {"loss", "loss_cons", "loss_pos", "loss_neg"}
    )
    assert (result.checkpoint / "model.safetensors").is_file()
    meta = json.loads((result.checkpoint / "metadata.json").read_text())
    assert meta["x"] == 1 and meta["world_size"] == 1
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert list(rows[0]) == ["step", "loss", "loss_cons", "loss_pos", "loss_neg", "lr"] and len(rows) == 3
    assert [step for step, _ in tracker.logged] == [1, 2, 3]
    keys = set(tracker.logged[0][1])
    assert {
        "train/loss",
        "train/loss_cons",
        "train/loss_pos",
        "train/loss_neg",
        "train/lr",
        "train/crops_per_s",
    } <= keys
    assert not (tmp_path / TRAIN_STATE).exists()  # a finished run leaves only the checkpoint


@pytest.mark.parametrize("mode,changes", [("frozen", False), ("train", True)])
@pytest.mark.slow
def test_batchnorm_mode(mode, changes):
    t = build_trainer(TrainConfig(bn_mode=mode), ModelConfig(), DistInfo())
    bn = next(m for m in t.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    optimize(t, random_batch(), TrainConfig(bn_mode=mode))
    assert (not torch.equal(before, bn.running_mean)) == changes
    assert t.model.visual.training and not t.model.clip.transformer.training


def test_optimizer_holds_image_encoder_parameters_only():
    t = build_trainer(TrainConfig(), ModelConfig(), DistInfo())
    in_opt = {id(p) for g in t.opt.param_groups for p in g["params"]}
    visual = {id(p) for p in t.model.visual.parameters() if p.requires_grad}
    assert in_opt == visual
    assert not any(id(p) in in_opt for p in t.model.clip.transformer.parameters())


def test_cpu_trains_in_fp32_unless_bf16_is_asked_for():
    for precision in ("auto", "fp16", "fp32"):
        assert amp_dtype(TrainConfig(precision=precision), torch.device("cpu")) is None
    assert amp_dtype(TrainConfig(precision="bf16"), torch.device("cpu")) is torch.bfloat16


def test_bf16_autocast_keeps_the_cosines_in_float32():
    """The encoder may run in bf16, but the margins act on cosines: those stay float32 (bf16 would
    round them to steps of ~0.002-0.004, a tenth of the rank margin)."""
    t = build_trainer(TrainConfig(precision="bf16"), ModelConfig(), DistInfo())
    x = torch.rand(4, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims = t.model.similarities(x, t.encoder)
        feats = t.model.encode(x, t.encoder)
    assert sims.dtype == torch.float32
    assert (sims.to(torch.bfloat16).float() != sims).any()  # not merely bf16 values widened
    torch.testing.assert_close(sims, (feats @ t.model.prompt_features.T).view(4, -1, 2), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_cpu_bf16_steps_fit_a_fixed_batch_and_keep_float32_weights():
    """bf16 autocast on CPU trains: the loss on one fixed batch falls, and weights stay float32."""
    cfg = TrainConfig(precision="bf16", lr=3e-3, warmup_steps=1, steps=40)
    t = build_trainer(cfg, ModelConfig(), DistInfo())
    assert t.amp_dtype is torch.bfloat16
    batch = random_batch()
    losses = [optimize(t, batch, cfg)["loss"] for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert all(p.dtype == torch.float32 for p in t.model.visual.parameters())


@pytest.mark.slow
def test_ema_is_the_moving_average_of_weights_and_batchnorm_statistics(shards, tmp_path):
    """train.ema: after each step ema <- d·ema + (1-d)·weights (first step: a copy), BatchNorm
    running statistics included; the average, not the last weights, becomes the model."""
    cfg = TrainConfig(ema=0.5, lr=3e-3, warmup_steps=1)
    t = build_trainer(cfg, ModelConfig(), DistInfo())
    snaps = []
    for _ in range(3):
        optimize(t, random_batch(), cfg)
        snaps.append({k: v.clone() for k, v in t.model.visual.state_dict().items()})
    averaged = t.ema.module.state_dict()
    for k, v in averaged.items():
        if v.is_floating_point():
            expected = 0.5 * (0.5 * snaps[0][k] + 0.5 * snaps[1][k]) + 0.5 * snaps[2][k]
            torch.testing.assert_close(v, expected, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(averaged[k], snaps[2][k]) for k in averaged if "running_mean" in k)

    result = run_train(
        TrainConfig(**{**TINY_TRAIN, "steps": 3, "ema": 0.5}), ModelConfig(), shards, tmp_path / "ema", progress=False
    )
    plain = run_train(
        TrainConfig(**{**TINY_TRAIN, "steps": 3}), ModelConfig(), shards, tmp_path / "plain", progress=False
    )
    assert result.final == plain.final  # the average does not change the trajectory
    assert json.loads((result.checkpoint / "metadata.json").read_text())["ema"] == 0.5
    a, b = _weights(tmp_path / "ema"), _weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("clip.visual."))


@pytest.mark.parametrize("ema", [1.0, -0.1])
def test_ema_outside_its_range_names_the_fix(ema):
    with pytest.raises(ConfigError, match=rf"train.ema must be a number in \[0, 1\), got {ema} \(0: off; e.g. 0.999\)"):
        TrainConfig(ema=ema)


def test_state_from_other_params_is_refused(shards, tmp_path):
    t = build_trainer(TrainConfig(), ModelConfig(), DistInfo())
    save_train_state(train_state(t, 1, "someone-else", []), tmp_path / TRAIN_STATE)
    cfg = TrainConfig(**TINY_TRAIN)
    with pytest.raises(TrainError, match="other params.*train.resume: false"):
        run_train(cfg, ModelConfig(), shards, tmp_path, progress=False)
    run_train(
        TrainConfig(**{**TINY_TRAIN, "steps": 1, "resume": False}), ModelConfig(), shards, tmp_path, progress=False
    )


def test_changed_params_are_refused_before_the_model_is_built_with_both_choices_named(shards, tmp_path, monkeypatch):
    """Issue 23: interrupted, a param changed, rerun: refused at once (no model build), naming what
    changed and the two ways on (restore the params / delete the state)."""
    import time

    import qualiclip.train as train

    cfg = TrainConfig(**{**TINY_TRAIN, "checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, ModelConfig(), shards, tmp_path, tracker=StopAt(3), progress=False)
    assert load_train_state(tmp_path / TRAIN_STATE)["step"] == 2

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the train state was checked")

    monkeypatch.setattr(train, "create_model", no_build)
    changed = TrainConfig(**{**TINY_TRAIN, "checkpoint_every": 2, "lr": 0.5})
    t0 = time.perf_counter()
    with pytest.raises(TrainError) as refused:
        run_train(changed, ModelConfig(), shards, tmp_path, progress=False)
    assert time.perf_counter() - t0 < 2.0
    message = str(refused.value)
    assert f"train.lr: {TrainConfig().lr!r} then, 0.5 now" in message, message
    assert "restore those params to resume from step 2" in message and f"delete {tmp_path / TRAIN_STATE}" in message


def test_state_from_other_params_written_before_states_recorded_them_is_refused(shards, tmp_path, monkeypatch):
    """A state of an earlier version (no ``params`` in it) is still refused before the build, without a diff."""
    import qualiclip.train as train

    t = build_trainer(TrainConfig(), ModelConfig(), DistInfo())
    state = train_state(t, 1, "someone-else", [])
    del state["params"]
    save_train_state(state, tmp_path / TRAIN_STATE)
    monkeypatch.setattr(train, "create_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(TrainError, match=r"other params .* than this run\. Fix, either: restore"):
        run_train(TrainConfig(**TINY_TRAIN), ModelConfig(), shards, tmp_path, progress=False)


def test_off_a_terminal_training_prints_progress_lines(shards, tmp_path):
    """Issue 23: under `dvc repro > log` (stdout and stderr a file) the train stage prints a line
    with step/total, loss, steps/s and ETA at least every PROGRESS_SECONDS (≤ 30 s; set to 0 here
    through its variable), and no progress bar."""
    import yaml
    from conftest import bin_path

    from qualiclip.train import PROGRESS_ENV, PROGRESS_SECONDS

    assert 0 < PROGRESS_SECONDS <= 30
    params = {
        "model": {"name": "qualiclip-tiny-rn"},
        "tracking": {"backend": "none"},
        "evaluate": {},
        "train": {**TINY_TRAIN, "steps": 5},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with open(tmp_path / "train.log", "w") as log:
        done = subprocess.run(
            [
                bin_path("qualiclip"),
                "train",
                "--params",
                str(tmp_path / "params.yaml"),
                "--shards",
                str(shards),
                "--out",
                str(tmp_path / "out"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CLEAN_ENV, PROGRESS_ENV: "0"},
            timeout=300,
        )
    text = (tmp_path / "train.log").read_text()
    assert done.returncode == 0, text
    lines = re.findall(r"^train: step (\d)/5 \(\d+%\), loss \d+\.\d{4}, \d+\.\d\d steps/s, ETA \d+s$", text, re.M)
    assert lines == ["1", "2", "3", "4"], text  # the 5th step is the stage's summary line
    assert "it/s" not in text and "step/s]" not in text and "\r" not in text  # no bar


def test_progress_lines_keep_their_interval(capsys):
    from qualiclip.train import ProgressLines

    lines = ProgressLines(every=3600.0)
    lines.step({"step": 1, "loss": 0.5}, range(0, 10))  # within the interval: nothing
    assert capsys.readouterr().out == ""
    lines.last -= 3600.0  # an interval later
    lines.step({"step": 2, "loss": 0.25}, range(0, 10))
    printed = capsys.readouterr().out
    assert printed.startswith("train: step 2/10 (20%), loss 0.2500, ") and " ETA " in printed


def test_fewer_shards_than_processes_names_the_fix(shards):
    with pytest.raises(TrainError, match="2 shards.*4 processes.*samples_per_shard"):
        shard_batches(TrainConfig(), shards, DistInfo(rank=0, world_size=4), LoaderStats(), skip=0)


ENTRY = '''
import json, os, signal, sys, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from qualiclip.model import ModelConfig
from qualiclip.tracking import Tracker
from qualiclip.train import TrainConfig, run_train

class KillAt(Tracker):
    """SIGKILL this process once step ``at`` has been logged: no cleanup, no atexit."""
    def __init__(self, at):
        self.at = at
    def log_metrics(self, metrics, step=None):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)

args = json.loads(sys.argv[1])
run_train(TrainConfig(**args["train"]), ModelConfig(), Path(args["shards"]), Path(args["out"]),
          tracker=KillAt(args["kill_at"]), progress=False)
'''


def _launch(tmp_path: Path, shards: Path, out: Path, kill_at: int | None, ema: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    args = {
        "train": {**TINY_TRAIN, "checkpoint_every": 2, "ema": ema},
        "shards": str(shards),
        "out": str(out),
        "kill_at": kill_at,
    }
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(args)],
        env={**os.environ, **CLEAN_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.8])  # with train.ema the average must resume too
def test_sigkill_then_resume_gives_identical_weights(shards, tmp_path, ema):
    full = _launch(tmp_path, shards, tmp_path / "full", None, ema)
    killed = _launch(tmp_path, shards, tmp_path / "resumed", kill_at=5, ema=ema)  # states at steps 2 and 4
    assert killed.wait(timeout=240) == -signal.SIGKILL, killed.stdout.read()
    state = load_train_state(tmp_path / "resumed" / TRAIN_STATE)
    assert state["step"] == 4 and not (tmp_path / "resumed" / "checkpoint").exists()

    resumed = _launch(tmp_path, shards, tmp_path / "resumed", None, ema)
    assert resumed.wait(timeout=240) == 0, resumed.stdout.read()
    assert full.wait(timeout=240) == 0, full.stdout.read()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_full = (tmp_path / "full" / "train_log.csv").read_text()
    assert log_full == (tmp_path / "resumed" / "train_log.csv").read_text() and log_full.count("\n") == 9
    assert not (tmp_path / "resumed" / TRAIN_STATE).exists()


# ---------------------------------------------------------------------------------------------
# Shards that changed (issue 19): refused before training, never mixed into a resumed run


def _other_runs_shard(shards: Path, tmp_path: Path) -> None:
    """shard-000001 replaced by the same shard of a run with another seed (4 samples, same shape)."""
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.sampling import SampleConfig

    other = DegradeConfig(
        variants=2,
        samples_per_shard=4,
        workers=1,
        seed=1,
        sample=SampleConfig(crop=64, distortions=("gaussian_blur", "white_noise", "jpeg", "brighten")),
    )
    run_degrade(other, shards.parent / "ingest", tmp_path / "other", progress=False)
    (shards / "shard-000001.tar").write_bytes((tmp_path / "other" / "shard-000001.tar").read_bytes())


def _same_size_damage(shards: Path, tmp_path: Path) -> None:
    """Bytes of shard-000001 overwritten in place: its size still matches the index."""
    with open(shards / "shard-000001.tar", "r+b") as f:
        f.seek(2000)
        f.write(b"\x00" * 64)


@pytest.mark.parametrize("change", [_other_runs_shard, _same_size_damage])
def test_a_shard_that_differs_from_the_index_is_refused(tmp_path, change):
    from qualiclip.shards import ShardError

    shards = build_shards(tmp_path / "a")
    change(shards, tmp_path)
    with pytest.raises(ShardError, match="shard-000001.tar.*replaced, damaged or from another run.*rerun the degrade"):
        run_train(TrainConfig(**TINY_TRAIN), ModelConfig(), shards, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "checkpoint").exists()


class StopAt(Tracker):
    """Raise once step ``at`` is logged, as a crash would: the train state written before stays."""

    def __init__(self, at: int):
        self.at = at

    def log_metrics(self, metrics, step=None):
        if step == self.at:
            raise KeyboardInterrupt


def test_a_train_state_is_not_resumed_on_other_shards(tmp_path):
    from qualiclip.degrade import DegradeConfig, run_degrade
    from qualiclip.sampling import SampleConfig

    shards = build_shards(tmp_path)
    cfg = TrainConfig(**{**TINY_TRAIN, "checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, ModelConfig(), shards, tmp_path / "out", tracker=StopAt(3), progress=False)
    assert load_train_state(tmp_path / "out" / TRAIN_STATE)["step"] == 2
    regenerated = DegradeConfig(
        variants=2,
        samples_per_shard=4,
        workers=1,
        seed=1,
        sample=SampleConfig(crop=64, distortions=("gaussian_blur", "white_noise", "jpeg", "brighten")),
    )
    run_degrade(regenerated, tmp_path / "ingest", shards, progress=False)  # new shards, same params
    with pytest.raises(TrainError, match=r"trained on other shards.*Fix: delete .*train_state.pt"):
        run_train(cfg, ModelConfig(), shards, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_a_batch_larger_than_the_training_set_is_refused_before_any_step(shards, tmp_path):
    cfg = TrainConfig(**{**TINY_TRAIN, "batch_size": 9})  # the shards hold 8 samples
    with pytest.raises(
        TrainError, match=r"^train.batch_size 9 is larger than the 8 samples in .* at most 8, or degrade"
    ):
        run_train(cfg, ModelConfig(), shards, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"train.batch_size must be an integer in \[1, 65536\], got 1000000000"):
        TrainConfig(batch_size=10**9)


def test_ctrl_c_stops_training_with_one_line_saying_where_it_resumes(shards, tmp_path):
    """The terminal's Ctrl-C (SIGINT to the whole process group): exit 130, one line, no traceback."""
    import time

    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "model": {},
                "evaluate": {},
                "tracking": {"backend": "none"},
                "train": {**TINY_TRAIN, "steps": 100_000, "checkpoint_every": 2, "num_workers": 1},
            }
        )
    )  # the default: a loader worker gets SIGINT too
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).with_name("qualiclip")),
        "train",
        "--params",
        str(params),
        "--shards",
        str(shards),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **CLEAN_ENV},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not (out / TRAIN_STATE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    kept = load_train_state(out / TRAIN_STATE)["step"]
    assert stderr.strip().splitlines()[-1] == (
        f"qualiclip train: stopped by Ctrl-C (SIGINT); the train state of step {kept} is kept in {out / TRAIN_STATE}: "
        f"rerun the same command to resume from step {kept} (the steps after it are redone, with the same result)"
    )
