"""Shared fixtures: the read-only real data in ../shared/data, tiny artefacts, and (from servers.py) real
servers on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

# fixtures: real servers on 127.0.0.1 (tests/servers.py)
from servers import dask_cluster, mlflow_server, postgres, s3_bucket, s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

# No telemetry, no hub retries, and a Prefect startup timeout that a fresh database on 2 cores meets.
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)
SHARED_DATA = Path(os.environ.get("QUALICLIP_SHARED_DATA", ROOT.parent / "shared" / "data"))

# A suite started in the background by a shell without job control (`pytest &`, nohup, some CI
# runners) inherits SIGINT ignored, and so would every command it starts: the Ctrl-C tests would
# then watch a command that never sees the signal. A terminal's Ctrl-C reaches a command with the
# default disposition, so the suite gives its children that one.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def shared_dir(name: str) -> Path:
    """The folder ``../shared/data/<name>``, or skip the test with a message saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: these tests need the shared real data (set QUALICLIP_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine OpenMP threads that spin
    while their sibling is descheduled made these tests 6x slower."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    return shared_dir("kodak") / "images"


@pytest.fixture(scope="session")
def bsds_dir() -> Path:
    return shared_dir("bsds500") / "images"


@pytest.fixture(scope="session")
def clive_dir() -> Path:
    return shared_dir("clive-dev")


def make_photos(folder: Path, n: int = 6, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """Write ``n`` small smooth RGB PNGs (gradients + blobs, so distortions are visible)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(n):
        img = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + c) * 0.5 + 0.5 for c in range(3)], -1)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"photo_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory) -> Path:
    """An ingest output of 4 small synthetic photos (72 × 96), all in the train split."""
    from qualiclip.ingest import IngestConfig, run_ingest

    root = tmp_path_factory.mktemp("ingest")
    photos = make_photos(root / "photos", n=4, size=(72, 96))
    run_ingest(
        IngestConfig(sources=(str(photos),), min_size=64, val_fraction=0.0, workers=1), root / "ingest", progress=False
    )
    return root / "ingest"


def degrade_cli(params: Path, ingest: Path, out: str | Path, **popen) -> subprocess.Popen:
    """``qualiclip degrade`` in a session of its own, so that a test can signal it with its pool workers."""
    import subprocess

    cmd = [bin_path("qualiclip"), "degrade", "--params", str(params), "--ingest", str(ingest), "--out", str(out)]
    return subprocess.Popen(cmd, env={**os.environ, **CLEAN_ENV}, start_new_session=True, **popen)


def kill_midway_then_rerun(params: Path, ingest: Path, out: str | Path, listing, total: int) -> str:
    """Run ``qualiclip degrade``; SIGKILL it and its pool workers (as an OOM kill or a lost node would)
    once ``listing()`` (the names in ``out``) shows a shard; check it died midway (1 to ``total`` - 1
    shards, no index); rerun it to the end. Returns the rerun's output."""
    import signal
    import subprocess
    import time

    proc = degrade_cli(params, ingest, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(n.endswith(".tar") for n in listing()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    names = listing()
    written = sum(n.endswith(".tar") for n in names)
    assert 1 <= written < total and "index.json" not in names, f"not killed midway ({written} shards)"
    rerun = degrade_cli(params, ingest, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log
    assert "resumed)" in log and " 0 resumed" not in log, log
    return log


def tiny_params(sources: list[str], **overrides) -> dict:
    """A params.yaml for a pipeline that runs in seconds: tiny crops, few types, few steps."""
    params = {
        "model": {"name": "qualiclip-tiny-rn", "pretrained": None},
        "tracking": {"backend": "mlflow"},
        "ingest": {"sources": sources, "min_size": 64, "val_fraction": 0.34, "workers": 1},
        "degrade": {
            "variants": 2,
            "samples_per_shard": 4,
            "workers": 1,
            "crop": 64,
            "distortions": ["gaussian_blur", "white_noise", "jpeg", "brighten"],
        },
        "train": {
            "steps": 3,
            "batch_size": 2,
            "num_workers": 0,
            "shuffle_buffer": 4,
            "log_every": 1,
            "threads": 1,
        },  # see one_thread: 30x faster on a busy 2-core machine
        "evaluate": {"crop": 64, "distortions": ["gaussian_blur", "jpeg"], "baseline": True, "batch_size": 16},
        "promotion": {},
        "plus": {},  # no dataset: the opt-in stage only records that it skipped
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        params[section][name] = value
    return params


def promoting_params() -> dict:
    """`tiny_params` whose first run promotes a champion (the MLflow-server tests need one).

    With shard format 4 (new noise draws) a 60-step model no longer beat its zero-shot baseline
    on the one held-out photo (synthetic SRCC -0.39 vs 0.49, srcc_within -0.05 vs 0.50): 200
    steps, judged on the ranking of levels within a photo and type, which is what training
    teaches (measured to promote, 2026-12-08)."""
    return tiny_params(
        ["photos"],
        degrade__variants=1,
        degrade__samples_per_shard=8,
        train__steps=200,
        promotion__metric="synthetic.srcc_within",
    )


CLEAN_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "GIT_AUTHOR_NAME": "qualiclip-tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "qualiclip-tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}


def make_dvc_project(root: Path, params: dict, env: dict | None = None, *, declare_sources: bool = True) -> Path:
    """A git + DVC project laid out like a clone of this repository: its dvc.yaml and .dvcignore,
    a copy of the ``qualiclip`` package (the code the stages run, from the project folder, and
    depend on), ``params`` as params.yaml, and, with ``declare_sources``, each ingest source
    folder added to the ingest stage's deps as README tells a user to."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "qualiclip", root / "qualiclip", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    if declare_sources:
        pipeline["stages"]["ingest"].setdefault("deps", []).extend(
            s for s in params["ingest"]["sources"] if s != "skimage"
        )
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\nphotos/\n")
    for cmd in (["git", "init", "-q"], [bin_path("dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # a clone's DVC settings (autostage)
    return root


def add_training_photo(folder: Path, val_fraction: float) -> Path:
    """Write one new photo into ``folder`` whose content hash puts it in the train split, so
    that every stage's inputs change (a held-out photo would leave the shards as they are)."""
    from qualiclip.identity import image_id
    from qualiclip.imageio import read_image
    from qualiclip.ingest import split_of

    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(100, 200):
            path = next(make_photos(Path(tmp) / str(seed), n=1, seed=seed).iterdir())
            if split_of(image_id(read_image(path).pixels), val_fraction) == "train":
                return Path(shutil.copy(path, folder / f"added-{seed}.png"))
    raise AssertionError("no candidate photo fell in the train split")


def bin_path(name: str) -> str:
    """A console script installed beside the running interpreter (qualiclip, dvc, prefect, mlflow)."""
    import sys

    return str(Path(sys.executable).with_name(name))


def run(cmd: list[str], cwd: Path, check: bool = True, **extra_env: str):
    """Run ``cmd`` as a user would in a project: the quiet environment, this virtualenv first on
    PATH, no tracking store or pipeline id inherited from the test process."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "QUALICLIP_PIPELINE"))}
    env.update(CLEAN_ENV, **extra_env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def run_unprivileged(fn, *args) -> None:
    """``fn(*args)`` as an unprivileged user: in a forked child running as ``nobody`` when this
    process is root (root reads any folder, so permission tests need a plain user), else here.
    The child's outcome is its exit status; ``fn`` writes what the test checks to files."""
    import traceback

    if os.geteuid() != 0:
        fn(*args)
        return
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn(*args)
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed (its traceback is above)"


def world_readable_dir() -> Path:
    """A fresh folder under /tmp that `run_unprivileged` can read and write (pytest's tmp_path
    lies under a folder only root may enter); the caller removes it."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="qualiclip-test-", dir="/tmp"))
    path.chmod(0o777)
    return path
