"""The retraining deployment on a process work pool, run by ``prefect worker start``, against a
Prefect server on PostgreSQL on 127.0.0.1; and the GPU host's global concurrency limit.

A database of the session's PostgreSQL 15 cluster (tests/servers.py: a temp dir, as the
``postgres`` user when the tests run as root: initdb refuses root) backs one ``prefect server start`` (the team setup of
docs/operations.md). Two tiny projects are deployed with ``python -m flows.retrain deploy`` onto
one process pool, both triggered at once, and one ``prefect worker start --run-once --limit 2``
runs both runs side by side: their train stages must not overlap (one slot of the host's
limit), while the runs themselves do.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_dvc_project, make_photos, tiny_params
from servers import free_port, http, new_database, wait_until
from test_ops_prefect import BIN, ROOT, STAGES, clean_env, flow_logs, prefect, run_flow, start, task_states

from flows.repro import stop_process_group

POOL = "gpu-hosts"
PROJECTS = ("a", "b")
GPU_LIMIT = f"qualiclip-gpu-{socket.gethostname()}"  # params.yaml's default schedule.gpu_limit on this host


# ---------------------------------------------------------------------------------------------
# The Prefect server on PostgreSQL (the cluster: tests/servers.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    """``prefect server start`` on 127.0.0.1 with its database on PostgreSQL (its own database in
    the session's cluster, `servers.postgres`), through asyncpg."""
    tmp = tmp_path_factory.mktemp("workers")
    url = new_database(postgres, "prefect").replace("postgresql://", "postgresql+asyncpg://", 1)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = clean_env(tmp, PREFECT_API_URL=api)
    proc = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        tmp / "server.log",
        {**env, "PREFECT_API_DATABASE_CONNECTION_URL": url},
    )
    try:
        wait_until(
            lambda: http(f"{api}/health") is True, "prefect server on PostgreSQL", proc, tmp / "server.log", timeout=240
        )
        yield {"tmp": tmp, "api": api, "env": env, "database": url}
    finally:
        stop_process_group(proc)


# ---------------------------------------------------------------------------------------------
# Two projects deployed on one process pool, both runs executed by one worker


def deploy(project: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.retrain", "deploy", "--project", str(project), "--pool", POOL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def mlflow_train_interval(project: Path) -> tuple[float, float]:
    """Start and end (s) of the train stage's MLflow run in the project's store: the training itself."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("qualiclip").experiment_id], filter_string="tags.`qualiclip.stage` = 'train'"
    )
    assert len(runs) == 1, f"{project}: {len(runs)} train runs"
    return runs[0].info.start_time / 1000, runs[0].info.end_time / 1000


@pytest.fixture(scope="module")
def worked(server):
    """Deploy projects a and b, trigger both, run ``prefect worker start --pool gpu-hosts
    --run-once --limit 2`` until it has run them; the flow-run ids and the worker's log."""
    tmp, env = server["tmp"], server["env"]
    projects, deploys = {}, {}
    for name in PROJECTS:
        params = tiny_params(["photos"], train__steps=20)
        params["schedule"] = {"deployment": f"retrain-{name}"}
        projects[name] = make_dvc_project(tmp / name, params, env)
        make_photos(projects[name] / "photos")
        deploys[name] = deploy(projects[name], env)
        assert deploys[name].returncode == 0, deploys[name].stdout + deploys[name].stderr
    flow_runs = {}
    for name in PROJECTS:
        run = prefect(["deployment", "run", f"qualiclip-retrain/retrain-{name}"], env)
        assert run.returncode == 0, run.stdout + run.stderr
        flow_runs[name] = run.stdout.split("UUID:")[1].split()[0]
    log = tmp / "worker.log"
    worker = start(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", "gpu-host-1", "--run-once", "--limit", "2"],
        log,
        env,
    )
    try:
        worker.wait(timeout=900)
    finally:
        stop_process_group(worker)
    yield {
        **server,
        "projects": projects,
        "deploys": deploys,
        "flow_runs": flow_runs,
        "worker_log": log.read_text(),
        "worker_code": worker.returncode,
    }


def flow_run(api: str, flow_run_id: str) -> dict:
    return http(f"{api}/flow_runs/{flow_run_id}")


def timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


@pytest.mark.slow
def test_worker_runs_the_deployment_on_the_process_pool_end_to_end(worked):
    api = worked["api"]
    assert "created process work pool 'gpu-hosts'" in worked["deploys"]["a"].stdout
    assert http(f"{api}/work_pools/{POOL}")["type"] == "process"
    assert worked["worker_code"] == 0, worked["worker_log"][-3000:]
    for name, flow_run_id in worked["flow_runs"].items():
        run = flow_run(api, flow_run_id)
        assert run["state"]["type"] == "COMPLETED", f"{name}: {run['state']}\n{worked['worker_log'][-3000:]}"
        assert run["work_pool_name"] == POOL and run["parameters"]["project_dir"] == str(worked["projects"][name])
        tasks = task_states(api, flow_run_id)
        assert {s: tasks[s]["name"] for s in STAGES} == dict.fromkeys(STAGES, "Completed")
        assert flow_run_id in worked["worker_log"]  # this worker submitted it
        assert (worked["projects"][name] / "outputs/eval/metrics.json").is_file()
    assert "Worker 'gpu-host-1' started" in worked["worker_log"]


@pytest.mark.slow
def test_two_runs_on_one_gpu_host_never_train_at_once(worked):
    api = worked["api"]
    runs = [flow_run(api, worked["flow_runs"][name]) for name in PROJECTS]
    starts, ends = [timestamp(r["start_time"]) for r in runs], [timestamp(r["end_time"]) for r in runs]
    assert max(starts) < min(ends), "the worker ran the two runs one after the other: nothing to test"
    (a0, a1), (b0, b1) = sorted(mlflow_train_interval(worked["projects"][name]) for name in PROJECTS)
    assert a1 <= b0, f"the trainings overlapped: {a0:.1f}-{a1:.1f} and {b0:.1f}-{b1:.1f}"
    for flow_run_id in worked["flow_runs"].values():
        messages = [e["message"] for e in flow_logs(api, flow_run_id)]
        assert (
            f"waiting for a slot of the global concurrency limit '{GPU_LIMIT}' (one training at a time on this host)"
            in messages
        )
        assert any(m.startswith(f"holding a slot of '{GPU_LIMIT}' after") for m in messages)


@pytest.mark.slow
def test_deploy_creates_the_host_limit_once_and_keeps_an_operators_size(worked):
    env = worked["env"]
    assert f"created global concurrency limit '{GPU_LIMIT}'" in worked["deploys"]["a"].stdout
    assert f"found global concurrency limit '{GPU_LIMIT}'" in worked["deploys"]["b"].stdout

    def inspect() -> dict:
        shown = prefect(["gcl", "inspect", GPU_LIMIT, "--output", "json"], env)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        return json.loads(shown.stdout)

    limit = inspect()
    assert (limit["limit"], limit["active"], limit["active_slots"]) == (1, True, 0)  # every slot released
    assert prefect(["gcl", "update", GPU_LIMIT, "--limit", "2"], env).returncode == 0  # a host with two GPUs
    again = deploy(worked["projects"]["a"], env)
    assert again.returncode == 0 and f"found global concurrency limit '{GPU_LIMIT}'" in again.stdout
    assert inspect()["limit"] == 2


@pytest.mark.slow
def test_the_server_keeps_its_state_in_postgresql(worked):
    import psycopg2

    url = worked["database"].replace("postgresql+asyncpg://", "postgresql://")
    with contextlib.closing(psycopg2.connect(url)) as db, db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM flow_run WHERE id::text = ANY(%s) AND state_type = 'COMPLETED'",
            (list(worked["flow_runs"].values()),),
        )
        assert cur.fetchone()[0] == len(PROJECTS)
        cur.execute('SELECT name, "limit" FROM concurrency_limit_v2 WHERE name = %s', (GPU_LIMIT,))
        assert cur.fetchone() is not None


@pytest.mark.slow
def test_a_missing_limit_is_an_error_not_an_unguarded_training(server):
    state = run_flow(
        server["env"],
        """
        from prefect import flow
        from flows import gpu_slot

        @flow(log_prints=True)
        def guarded():
            with gpu_slot.held("qualiclip-gpu-nowhere", timeout=30):
                print("training without a slot")

        state = guarded(return_state=True)
    """,
        ROOT,
    )
    assert state["type"] == "FAILED"
    messages = [e["message"] for e in flow_logs(server["api"], state["flow_run_id"])]
    assert not any("training without a slot" in m for m in messages)
    assert any("qualiclip-gpu-nowhere" in m and "ConcurrencySlotAcquisitionError" in m for m in messages), messages
