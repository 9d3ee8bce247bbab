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
schedule: {}
promotion: {}
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


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status == 200


def clean_env(tmp: Path, **extra: str) -> dict:
    """This environment without tracking/API settings that would point at another store."""
    drop = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_PROFILE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **QUIET, "PREFECT_HOME": str(tmp / "prefect-home"), "PYTHONPATH": str(ROOT),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


# ---------------------------------------------------------------------------------------------
# Fixtures: one pipeline run through the served deployment, then the MLflow servers


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Prefect server + served deployment + one ``deployment run --watch`` on a tiny project."""
    tmp = tmp_path_factory.mktemp("ops")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = clean_env(tmp, PREFECT_API_URL=api)
    photos = make_photos(tmp / "photos")
    project = make_project(tmp / "project", tmp / "photos", env=env)
    procs: list[subprocess.Popen] = []
    try:
        port = api.rsplit(":", 1)[1].split("/")[0]
        procs.append(start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
                           tmp / "server.log", env))
        wait_until(lambda: http(f"{api}/health") is True, "prefect server", procs[-1], tmp / "server.log")
        procs.append(start([sys.executable, "-m", "flows.retrain", "serve", "--project", str(project)],
                           tmp / "serve.log", env))
        wait_until(lambda: http(f"{api}/deployments/name/{DEPLOYMENT}")["id"], "flows.retrain serve",
                   procs[-1], tmp / "serve.log")
        t0 = time.monotonic()
        run = prefect(["deployment", "run", DEPLOYMENT, "--watch", "--watch-timeout", "400"], env, timeout=420)
        yield {"tmp": tmp, "api": api, "env": env, "project": project, "photos": photos, "run": run,
               "seconds": time.monotonic() - t0, "serve_log": tmp / "serve.log"}
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.fixture(scope="module")
def mlflow_urls(loop):
    """``mlflow models serve`` of the champion and ``mlflow server`` on the project's store, started together."""
    tmp, project = loop["tmp"], loop["project"]
    store = f"sqlite:///{project / 'mlflow.db'}"
    env = clean_env(tmp, MLFLOW_TRACKING_URI=store)
    model_port, server_port = free_port(), free_port()
    procs = [
        start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/qualiclip@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(model_port)], tmp / "models-serve.log", env, cwd=project),
        start([str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--artifacts-destination",
               str(project / "mlartifacts"), "--host", "127.0.0.1", "--port", str(server_port)],
              tmp / "mlflow-server.log", env, cwd=project),
    ]
    urls = {"model": f"http://127.0.0.1:{model_port}", "server": f"http://127.0.0.1:{server_port}"}
    try:
        wait_until(lambda: answers(urls["model"] + "/ping"), "mlflow models serve", procs[0], tmp / "models-serve.log")
        wait_until(lambda: answers(urls["server"] + "/health"), "mlflow server", procs[1], tmp / "mlflow-server.log")
        yield urls
    finally:
        for proc in procs:
            stop(proc)


# ---------------------------------------------------------------------------------------------
# Fast: the workspace lock


def test_second_trigger_is_refused_with_a_clear_message_then_gets_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(3)",
         str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match=r"another qualiclip run holds .*\.qualiclip\.lock.*lock_timeout"):
            with workspace_lock(tmp_path, timeout=0.3):
                pass
        with workspace_lock(tmp_path, timeout=30) as path:  # waits for the holder to let go
            assert path == (tmp_path / LOCK_FILE).resolve()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# Slow: the daily loop on real servers


def _registry(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_deployment_run_completes_and_promotes_a_champion(loop):
    run = loop["run"]
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{loop['serve_log'].read_text()[-3000:]}"
    assert "Completed" in run.stdout
    client = _registry(loop["project"])
    stages = {r.data.tags.get("qualiclip.stage") for r in client.search_runs(
        [client.get_experiment_by_name("qualiclip").experiment_id])}
    assert {"ingest", "degrade", "train", "evaluate"} <= stages
    champion = client.get_model_version_by_alias("qualiclip", "champion")
    metrics = json.loads((loop["project"] / "outputs/eval/metrics.json").read_text())
    assert float(champion.tags["eval.synthetic.srcc"]) == pytest.approx(metrics["synthetic"]["srcc"])
    assert champion.tags["params_hash"] and champion.tags["data_version"]
    assert "promoted" in champion.tags["promotion"]


@pytest.mark.slow
def test_failed_stage_fails_the_flow_run_with_the_stage_error_in_its_logs(loop):
    # a params error now fails the flow before dvc repro starts; a missing photo folder fails a stage
    broken = make_project(loop["tmp"] / "broken", loop["tmp"] / "no-such-photos", env=loop["env"])
    run = prefect(["deployment", "run", DEPLOYMENT, "--param", f"project_dir={broken}", "--watch"], loop["env"])
    assert run.returncode != 0 and "Failed" in run.stdout + run.stderr
    flow_run_id = run.stdout.split("UUID:")[1].split()[0]
    logs = prefect(["flow-run", "logs", flow_run_id], loop["env"]).stdout
    assert "no-such-photos" in logs and "dvc repro failed" in logs


@pytest.mark.slow
def test_champion_served_scores_equal_the_library(loop, mlflow_urls):
    from qualiclip.scoring import score_images

    photos = loop["photos"][:3]
    expected = score_images(photos, loop["project"] / "outputs/train/checkpoint")
    url = mlflow_urls["model"] + "/invocations"
    by_bytes = http(url, {"dataframe_records": [{"image": base64.b64encode(p.read_bytes()).decode()} for p in photos]})
    by_path = http(url, {"dataframe_records": [{"path": str(p)} for p in photos]})
    for answer in (by_bytes, by_path):
        got = [row["score"] for row in answer["predictions"]]
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_champion_served_answers_bad_input_with_a_clear_error_not_a_stack_trace(loop, mlflow_urls):
    url = mlflow_urls["model"] + "/invocations"
    good = base64.b64encode(loop["photos"][0].read_bytes()).decode()
    rows = http(url, {"dataframe_records": [{"image": good}, {"image": "%%% not base64"}]})["predictions"]
    assert 0 <= rows[0]["score"] <= 1 and rows[0]["error"] is None
    assert rows[1] == {"score": None, "error": "row 1: not base64"}  # the other rows are still scored
    with pytest.raises(urllib.error.HTTPError) as refused:
        http(url, {"dataframe_records": [{"img": good}]})
    body = json.loads(refused.value.read())
    assert refused.value.code == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "needs one input column, 'image'" in body["message"] and "stack_trace" not in body


@pytest.mark.slow
def test_mlflow_server_lists_the_pipeline_runs_metrics_and_model_over_rest(loop, mlflow_urls):
    api = mlflow_urls["server"] + "/api/2.0/mlflow"
    exp = http(f"{api}/experiments/get-by-name?experiment_name=qualiclip")["experiment"]
    runs = http(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                       "filter": "tags.`qualiclip.stage` = 'evaluate'"})["runs"]
    assert runs, "no evaluate run in the store"
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    expected = json.loads((loop["project"] / "outputs/eval/metrics.json").read_text())["synthetic"]["srcc"]
    assert metrics["synthetic.srcc"] == pytest.approx(expected)
    pipeline = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}["qualiclip.pipeline_id"]
    same = http(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                       "filter": f"tags.`qualiclip.pipeline_id` = '{pipeline}'"})["runs"]
    assert len(same) >= 5  # the parent run and the four stage runs
    model = http(f"{api}/registered-models/get?name=qualiclip")["registered_model"]
    assert any(a["alias"] == "champion" for a in model.get("aliases", []))
