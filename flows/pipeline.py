"""The whole pipeline as a Prefect flow: ``dvc repro``, so dvc.yaml stays the one DAG.

Stages whose inputs did not change are skipped by DVC. The flow-run id becomes the pipeline id
that groups the stage runs in MLflow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from qualiclip.pipeline.paths import stage_paths
from qualiclip.pipeline.tracking import PIPELINE_ENV


class StageFailed(RuntimeError):
    """``dvc repro`` failed; the message carries the failing stage's last output lines."""


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")  # the dvc beside this interpreter, not a stray one
    return str(exe) if exe.exists() else "dvc"


@task(name="dvc-repro")
def dvc_repro(project_dir: str, targets: list[str] | None = None, force: bool = False) -> None:
    """Run ``dvc repro`` in ``project_dir``, streaming its output into the Prefect logs."""
    log = get_run_logger()
    env = {**os.environ, PIPELINE_ENV: str(flow_run.id or os.environ.get(PIPELINE_ENV, "")), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [_dvc(), "repro", *(["--force"] if force else []), *(targets or [])]
    log.info("running %s in %s", " ".join(cmd), project_dir)
    proc = subprocess.Popen(cmd, cwd=project_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line and "\r" not in line:
            log.info(line)
        tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        raise StageFailed(f"dvc repro failed (exit {proc.returncode}):\n" + "\n".join(tail))


@task(name="read-metrics")
def read_metrics(project_dir: str) -> dict:
    """The evaluate stage's metrics (the file dvc.yaml names), or {} when there are none yet."""
    path = Path(project_dir) / stage_paths(project_dir).metrics
    return json.loads(path.read_text()) if path.is_file() else {}


class PushFailed(RuntimeError):
    """``dvc push`` failed; the message carries its last output lines."""


def _network_error(task, task_run, state) -> bool:
    """Retry a push that failed on the way to the remote, not one with no remote configured."""
    return "config file error" not in str(state.result(raise_on_failure=False))


@task(name="dvc-push", retries=2, retry_delay_seconds=30, retry_condition_fn=_network_error)
def dvc_push(project_dir: str) -> None:
    """Upload every output ``dvc.lock`` records to the default DVC remote (``dvc remote add -d``), so
    another clone gets them with ``dvc pull`` instead of recomputing them."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([_dvc(), "push"], cwd=project_dir, env=env, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise PushFailed(f"dvc push failed (exit {proc.returncode}) in {project_dir}:\n{output[-3000:]}")
    get_run_logger().info("dvc push: %s", output.splitlines()[-1] if output else "done")


@flow(name="qualiclip-pipeline", log_prints=True)
def pipeline_flow(project_dir: str = ".", targets: list[str] | None = None, force: bool = False) -> dict:
    """Reproduce the DVC pipeline and return the evaluation metrics."""
    dvc_repro(project_dir, targets, force)
    return read_metrics(project_dir)


if __name__ == "__main__":
    pipeline_flow()
