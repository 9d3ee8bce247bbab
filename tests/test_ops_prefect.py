"""The daily loop against real servers on 127.0.0.1: Prefect deployment → pipeline → champion → serving.

One module-scoped fixture builds a tiny DVC project, starts ``prefect server``, serves the
``scheduled-retraining`` deployment and triggers it with ``prefect deployment run --watch``: the
pipeline runs once, and the MLflow tests read its store. Every process is started in its own
session and shut down by its PID in a ``finally``.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from flows.retrain import LOCK_FILE, WorkspaceBusy, workspace_lock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "qualiclip-retrain/scheduled-retraining"
QUIET = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
         "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
         "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
TINY_PARAMS = """\
model: {name: qualiclip-tiny-rn, pretrained: null, seed: 0}
tracking: {backend: mlflow}
ingest: {sources: [%s], min_size: 64}
degrade: {variants: 1, samples_per_shard: 8, workers: 1, crop: 64, distortions: [gaussian_blur, white_noise, jpeg, brighten]}
train: {steps: 3, batch_size: 2, num_workers: 0}
evaluate: {crop: 64, distortions: [gaussian_blur, jpeg], baseline: false}
"""


# ---------------------------------------------------------------------------------------------
# Helpers: tiny project, processes, HTTP


def make_photos(folder: Path, n: int = 5) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:112, 0:128]
    paths = []
    for i in range(n):
        base = np.stack([(x * (i + 1)) % 256, (y * 2 + 30 * i) % 256, ((x + y) * 3) % 256], -1)
        pixels = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)  # (112, 128, 3)
        paths.append(folder / f"photo{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def make_project(root: Path, photos: Path, params: str = TINY_PARAMS, env: dict | None = None) -> Path:
    """A git + DVC project with this repository's dvc.yaml and tiny params."""
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (root / "params.yaml").write_text(params % photos if "%s" in params else params)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``cmd`` in its own session (its children die with it), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (its PID), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def http(url: str, payload: dict | None = None, timeout: float = 60) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def wait_until(ok, what: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``ok()`` until true; fail with the process log if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            if ok():
                return
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def prefect(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
