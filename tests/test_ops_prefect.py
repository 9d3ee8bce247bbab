"""The daily loop against real servers on 127.0.0.1: Prefect deployment → one task per DVC stage →
promotion through the quality gate → report artifact → serving; and what a run shows when a
stage warns, fails or runs out of time, and who is told.

A module-scoped Prefect server serves every test. The ``loop`` fixture builds a tiny DVC project,
serves the ``scheduled-retraining`` deployment and triggers it with ``prefect deployment run
--watch``; later tests trigger it again (nothing changed, then a photo added) and read the task
runs, logs and artifacts of each run over the REST API. Every process is started in its own
session and shut down by its PID in a ``finally``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import add_training_photo, make_dvc_project
from noise import noise_lines
from servers import answers, free_port, http, start_logged, wait_until

from flows.repro import stop_process_group
from flows.retrain import LOCK_FILE, WorkspaceBusy, workspace_lock
from qualiclip.train import PROGRESS_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "qualiclip-retrain/scheduled-retraining"
STAGES = ["ingest", "degrade", "train", "evaluate", "plus"]  # plus: the opt-in QualiCLIP+ stage
QUIET = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}
# 60 steps: with these photos the model then beats its zero-shot baseline (synthetic SRCC 0.763
# against 0.591, measured), so the gate lets the first run promote a champion to serve.
TINY_PARAMS = {
    "model": {"name": "qualiclip-tiny-rn", "pretrained": None, "seed": 0},
    "tracking": {"backend": "mlflow"},
    "ingest": {"sources": ["photos"], "min_size": 64},
    "degrade": {
        "variants": 1,
        "samples_per_shard": 8,
        "workers": 1,
        "crop": 64,
        "distortions": ["gaussian_blur", "white_noise", "jpeg", "brighten"],
    },
    "train": {"steps": 60, "batch_size": 2, "num_workers": 0, "threads": 1},
    "evaluate": {"crop": 64, "distortions": ["gaussian_blur", "jpeg"], "baseline": True},
    "plus": {},  # no rated set: the opt-in stage only records that it skipped
    "schedule": {},
    "promotion": {},
}


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


def start(cmd: list[str], log: Path, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    return start_logged(cmd, log, env, cwd)


def prefect(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def clean_env(tmp: Path, **extra: str) -> dict:
    """This environment without tracking/API settings that would point at another store."""
    drop = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_PROFILE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {
        **env,
        **QUIET,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PYTHONPATH": str(ROOT),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    }


def rest(api: str, path: str, body: dict) -> list[dict]:
    """POST a Prefect REST filter (``task_runs/filter``, ``logs/filter`` ...) and return the rows."""
    return http(f"{api}/{path}", body)


def task_states(api: str, flow_run_id: str) -> dict[str, dict]:
    """``{task run name: its state}`` of one flow run, read over the REST API."""
    runs = rest(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"]: r["state"] for r in runs}


def flow_logs(api: str, flow_run_id: str) -> list[dict]:
    return rest(
        api, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    )


def trigger(loop: dict, *params: str) -> tuple[subprocess.CompletedProcess, str]:
    """``prefect deployment run --watch`` (with ``--param`` k=v); the process and the flow-run id."""
    args = [a for kv in params for a in ("--param", kv)]
    run = prefect(
        ["deployment", "run", DEPLOYMENT, *args, "--watch", "--watch-timeout", "500"], loop["env"], timeout=520
    )
    return run, run.stdout.split("UUID:")[1].split()[0]


def run_flow(api_env: dict, code: str, cwd: Path) -> dict:
    """Run a flow in a fresh interpreter against the test server; ``code`` sets ``state``.
    Returns the final state's type, name and flow-run id."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import json
        print("STATE", json.dumps({"type": state.type.value, "name": state.name,
                                   "flow_run_id": str(state.state_details.flow_run_id)}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**api_env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    found = re.search(r"^STATE (.*)$", proc.stdout, re.M)
    assert found, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(found.group(1))


def small_project(root: Path, stages: dict, files: dict[str, str], params: str = "{}\n") -> Path:
    """A git + DVC project of the given stages (commands are small Python scripts in ``files``)."""
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(params)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


class Webhook(ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 that keeps the JSON bodies posted to it."""

    def __init__(self):
        received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.received = received
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"


# ---------------------------------------------------------------------------------------------
# Fixtures: the Prefect server, one pipeline run through the served deployment, the MLflow servers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on a free loopback port; its API URL and a matching environment."""
    tmp = tmp_path_factory.mktemp("ops")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = clean_env(tmp, PREFECT_API_URL=api)
    proc = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp / "server.log", env
    )
    try:
        wait_until(lambda: http(f"{api}/health") is True, "prefect server", proc, tmp / "server.log")
        yield {"tmp": tmp, "api": api, "env": env}
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def loop(server):
    """The served deployment and its first ``deployment run --watch`` on a tiny project."""
    tmp, env = server["tmp"], server["env"]
    project = make_dvc_project(tmp / "project", TINY_PARAMS, env)
    photos = make_photos(project / "photos")
    serve = start(
        [sys.executable, "-m", "flows.retrain", "serve", "--project", str(project)],
        tmp / "serve.log",
        {**env, PROGRESS_ENV: "2"},
    )  # training's progress lines every 2 s, not every 20 s
    try:
        wait_until(
            lambda: http(f"{server['api']}/deployments/name/{DEPLOYMENT}")["id"],
            "flows.retrain serve",
            serve,
            tmp / "serve.log",
        )
        t0 = time.monotonic()
        loop = {**server, "project": project, "photos": photos, "serve_log": tmp / "serve.log"}
        loop["run"], loop["flow_run_id"] = trigger(loop)
        loop["seconds"] = time.monotonic() - t0
        yield loop
    finally:
        stop_process_group(serve)


@pytest.fixture(scope="module")
def mlflow_urls(loop):
    """``mlflow models serve`` of the champion and ``mlflow server`` on the project's store, started together."""
    tmp, project = loop["tmp"], loop["project"]
    store = f"sqlite:///{project / 'mlflow.db'}"
    env = clean_env(tmp, MLFLOW_TRACKING_URI=store)
    serve_env = {**env, "QUALICLIP_SERVE_ROOT": str(loop["photos"][0].parent)}  # the `path` column's folder
    model_port, server_port = free_port(), free_port()
    procs = [
        start(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/qualiclip@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(model_port),
            ],
            tmp / "models-serve.log",
            serve_env,
            cwd=project,
        ),
        start(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                store,
                "--artifacts-destination",
                str(project / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(server_port),
            ],
            tmp / "mlflow-server.log",
            env,
            cwd=project,
        ),
    ]
    urls = {"model": f"http://127.0.0.1:{model_port}", "server": f"http://127.0.0.1:{server_port}"}
    try:
        wait_until(lambda: answers(urls["model"] + "/ping"), "mlflow models serve", procs[0], tmp / "models-serve.log")
        wait_until(lambda: answers(urls["server"] + "/health"), "mlflow server", procs[1], tmp / "mlflow-server.log")
        yield urls
    finally:
        for proc in procs:
            stop_process_group(proc)


# ---------------------------------------------------------------------------------------------
# Fast: the workspace lock


def test_second_trigger_is_refused_with_a_clear_message_then_gets_the_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(3)",
            str(tmp_path / LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
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


def test_a_stale_stage_is_described_in_one_short_line():
    """`dvc status --json` of a stage whose code changed lists every file: the line names the data
    and params first and counts the rest (issue 23: one line per stage, readable)."""
    from flows.repro import describe_changes

    code = {f"qualiclip/m{i}.py": "modified" for i in range(20)}
    line = describe_changes(
        [
            {"changed deps": {**code, "photos": "modified", "params.yaml": "new"}},
            {"changed outs": {"data/ingest": "deleted"}},
            "always changed",
        ]
    )
    assert line == (
        "changed deps: photos (modified), params.yaml (new), qualiclip/m0.py (modified), "
        "qualiclip/m1.py (modified) and 18 more; changed outs: data/ingest (deleted); always changed"
    )


# ---------------------------------------------------------------------------------------------
# What a run shows: stage output at its level, a stage's own failure, the timeout


TALK = """
    import sys, warnings
    print("plain progress line")
    print("\\x1b[33mWARNING qualiclip.x: careful, colours\\x1b[0m", file=sys.stderr)
    warnings.warn("an old option")
    print("ERROR qualiclip.y: something broke", file=sys.stderr)
    open("talk.txt", "w").write("ok")
"""
FAIL = """
    import sys
    print("qualiclip ingest: error: unknown key 'min_sise' in params section 'ingest'", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow
def test_stage_output_reaches_its_task_log_at_its_level_and_a_failure_carries_the_stage_exit_code(server):
    project = small_project(
        server["tmp"] / "talky",
        {
            "talk": {"cmd": "python talk.py", "deps": ["talk.py"], "outs": ["talk.txt"]},
            "fail": {"cmd": "python fail.py", "deps": ["talk.txt", "fail.py"], "outs": ["fail.txt"]},
        },
        {"talk.py": TALK, "fail.py": FAIL},
    )
    state = run_flow(
        server["env"],
        f"""
        from flows.repro import repro_flow
        state = repro_flow({str(project)!r}, return_state=True)
    """,
        project,
    )
    assert state["type"] == "FAILED"
    tasks = task_states(server["api"], state["flow_run_id"])
    assert tasks["talk"]["type"] == "COMPLETED" and tasks["fail"]["type"] == "FAILED"
    message = tasks["fail"]["message"]
    assert "stage 'fail' failed with exit code 2" in message and "unknown key 'min_sise'" in message
    logs = {(entry["level"], entry["message"]) for entry in flow_logs(server["api"], state["flow_run_id"])}
    assert (20, "plain progress line") in logs
    assert (30, "WARNING qualiclip.x: careful, colours") in logs  # at its level, no colour codes
    assert any(level == 30 and "UserWarning: an old option" in m for level, m in logs)
    assert (40, "ERROR qualiclip.y: something broke") in logs
    assert not any("\x1b" in m for _, m in logs)


@pytest.mark.slow
def test_flow_timeout_stops_the_running_stage_and_fails_the_run(server):
    project = small_project(
        server["tmp"] / "slow",
        {
            "slow": {"cmd": "python slow.py", "deps": ["slow.py"], "outs": ["slow.txt"]},
        },
        {
            "slow.py": """
        import os, time
        open("slow.pid", "w").write(str(os.getpid()))
        time.sleep(300)
    """
        },
        params="schedule: {timeout: 8}\n",
    )
    t0 = time.monotonic()
    state = run_flow(
        server["env"],
        f"""
        from flows.retrain import retrain_flow
        state = retrain_flow({str(project)!r}, return_state=True)
    """,
        project,
    )
    assert time.monotonic() - t0 < 120 and state["type"] == "FAILED"
    assert task_states(server["api"], state["flow_run_id"])["slow"]["name"] == "TimedOut"
    pid = int((project / "slow.pid").read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX", "the stage outlived the timeout"


# ---------------------------------------------------------------------------------------------
# Slow: the daily loop on real servers


def _registry(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_deployment_run_shows_a_task_per_stage_promotes_through_the_gate_and_reports(loop):
    run = loop["run"]
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{loop['serve_log'].read_text()[-3000:]}"
    assert "Completed" in run.stdout
    tasks = task_states(loop["api"], loop["flow_run_id"])
    assert {s: tasks[s]["name"] for s in STAGES} == dict.fromkeys(STAGES, "Completed")
    assert tasks["promote"]["type"] == tasks["report"]["type"] == "COMPLETED"
    logs = [entry["message"] for entry in flow_logs(loop["api"], loop["flow_run_id"])]
    assert logs and not [m for m in logs if re.search(r"\d+%\||\d+/\d+ \[\d", m)], "progress bars in the run log"
    client = _registry(loop["project"])
    champion = client.get_model_version_by_alias("qualiclip", "champion")
    metrics = json.loads((loop["project"] / "outputs/eval/metrics.json").read_text())
    assert metrics["synthetic"]["srcc"] > metrics["baseline"]["synthetic"]["srcc"]  # the gate's first test
    assert float(champion.tags["eval.synthetic.srcc"]) == pytest.approx(metrics["synthetic"]["srcc"])
    assert champion.tags["params_hash"] and champion.tags["data_version"]
    assert champion.tags["promotion.outcome"] == "promoted" and "no champion yet" in champion.tags["promotion"]
    artifacts = rest(loop["api"], "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [loop["flow_run_id"]]}}})
    report = next(a["data"] for a in artifacts if a["key"] == "qualiclip-retrain-report")
    run_id = json.loads((loop["project"] / "outputs/train/registered_model.json").read_text())["run_id"]
    assert "## qualiclip retraining: Promoted" in report and champion.tags["promotion"] in report
    assert champion.description.startswith("**Promoted** — ")  # the top of its MLflow page
    assert f"| synthetic.srcc on the same {metrics['n_synthetic']} images of " in report  # the decision's table
    assert f"| synthetic.srcc on the same {metrics['n_synthetic']} images of " in champion.description
    assert f"`models:/qualiclip/{champion.version}`" in report and f"`{run_id}`" in report
    assert (
        f"| **synthetic.srcc** (promotion) | {metrics['synthetic']['srcc']:.4f} | – | "
        f"{metrics['baseline']['synthetic']['srcc']:.4f} |" in report
    )
    assert "Stages: ingest Completed, degrade Completed, train Completed, evaluate Completed" in report


@pytest.mark.slow
def test_the_run_log_follows_training_and_says_what_each_stage_did_without_noise(loop):
    """Issue 23: training's progress lines in the train task's log at INFO; no line of the noise
    the issue lists; the MLflow parent run named as the Prefect UI names the flow run, and when."""
    entries = flow_logs(loop["api"], loop["flow_run_id"])
    assert noise_lines("\n".join(e["message"] for e in entries)) == [], [e["message"] for e in entries]
    line = r"train: step \d+/60 \(\d+%\), loss \d+\.\d{4}, \d+\.\d\d steps/s, ETA (\d+s|\d+m\d\ds|\d+h\d\dm)"
    progress = [e for e in entries if re.fullmatch(line, e["message"])]
    assert progress and {e["level"] for e in progress} == {20}, [e["message"] for e in entries]
    assert {e["task_run_id"] for e in progress} == {task_states_ids(loop["api"], loop["flow_run_id"])["train"]}
    flow_run = http(f"{loop['api']}/flow_runs/{loop['flow_run_id']}")
    client = _registry(loop["project"])
    parent = client.search_runs(
        [client.get_experiment_by_name("qualiclip").experiment_id],
        f"tags.`qualiclip.execution_id` = '{loop['flow_run_id']}' and tags.`qualiclip.kind` = 'execution'",
    )
    assert re.fullmatch(
        rf"qualiclip-retrain/{re.escape(flow_run['name'])} \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", parent[0].info.run_name
    ), parent[0].info.run_name


def task_states_ids(api: str, flow_run_id: str) -> dict[str, str]:
    """``{task run name: its id}`` of one flow run."""
    return {r["name"]: r["id"] for r in rest(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})}


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
    runs = http(
        f"{api}/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`qualiclip.stage` = 'evaluate'"},
    )["runs"]
    assert runs, "no evaluate run in the store"
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    expected = json.loads((loop["project"] / "outputs/eval/metrics.json").read_text())["synthetic"]["srcc"]
    assert metrics["synthetic.srcc"] == pytest.approx(expected)
    execution = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}["qualiclip.execution_id"]
    same = http(
        f"{api}/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": f"tags.`qualiclip.execution_id` = '{execution}'"},
    )["runs"]
    assert len(same) >= 5  # the parent run and the four stage runs that log (plus, skipped, logs none)
    model = http(f"{api}/registered-models/get?name=qualiclip")["registered_model"]
    assert any(a["alias"] == "champion" for a in model.get("aliases", []))


def test_a_refused_or_kept_model_ends_the_run_completed_and_named_not_promoted():
    """Told apart from a promotion at a glance in the runs list, and not a failure."""
    from flows.retrain import NotPromotedInWords, final_state
    from qualiclip.pipeline.promotion import Decision

    def decision(outcome: str) -> Decision:
        return Decision("m", "2", outcome == "promoted", outcome, "synthetic.srcc", 0.5, 0.1, 0.0, "1", 0.4, outcome)

    for outcome, name in [
        ("promoted", "Completed"),
        ("unchanged", "Completed"),
        ("kept", "Not promoted"),
        ("refused", "Not promoted"),
    ]:
        state = final_state(decision(outcome), {"promotion": outcome})
        assert state.is_completed() and state.name == name and state.message == outcome
        assert state.result() == {"promotion": outcome}
    line = logging.LogRecord(
        "prefect.flow_runs", 20, "", 0, "Finished in state %s", ("Not promoted('x', type=COMPLETED)",), None
    )
    assert NotPromotedInWords().filter(line) and line.getMessage() == (
        "finished: completed, not promoted (the promote task and the report say why)"
    )


@pytest.mark.slow
def test_second_run_with_nothing_changed_skips_every_stage(loop):
    run, flow_run_id = trigger(loop)
    assert run.returncode == 0, run.stdout[-3000:]
    tasks = task_states(loop["api"], flow_run_id)
    assert {s: (tasks[s]["type"], tasks[s]["name"]) for s in STAGES} == dict.fromkeys(STAGES, ("COMPLETED", "Skipped"))
    messages = [e["message"] for e in flow_logs(loop["api"], flow_run_id)]
    assert messages.count("skipped: dependencies, params and outputs unchanged (dvc status), nothing to run") == len(
        STAGES
    )
    assert noise_lines("\n".join(messages)) == [], messages  # no `Skipped('…', type=COMPLETED)`
    champion = _registry(loop["project"]).get_model_version_by_alias("qualiclip", "champion")
    assert "is already the champion" in champion.tags["promotion"]


@pytest.mark.slow
def test_an_added_photo_reruns_every_stage(loop):
    add_training_photo(loop["project"] / "photos", val_fraction=0.25)  # ingest.val_fraction's default
    run, flow_run_id = trigger(loop)
    assert run.returncode == 0, run.stdout[-3000:]
    tasks = task_states(loop["api"], flow_run_id)
    assert {s: tasks[s]["name"] for s in STAGES} == dict.fromkeys(STAGES, "Completed")


# ---------------------------------------------------------------------------------------------
# A failed run: the stage's exit code and error in the run, and a notification through the automation


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        yield hook
    finally:
        hook.shutdown()
        hook.server_close()


@pytest.mark.slow
def test_failed_run_names_the_stage_exit_code_and_error_and_notifies(loop, webhook):
    alert = subprocess.run(
        [sys.executable, "-m", "flows.retrain", "alert", "--webhook-url", webhook.url],
        cwd=ROOT,
        env=loop["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alert.returncode == 0, alert.stderr[-2000:]
    # a params typo now fails the flow before any stage (the whole file is checked first); a photo
    # folder with no usable image fails the ingest stage itself, with its exit code 2
    broken = make_dvc_project(loop["tmp"] / "broken", TINY_PARAMS, loop["env"])
    (broken / "photos").mkdir()
    (broken / "photos" / "photo.jpg").write_bytes(b"not an image")
    run, flow_run_id = trigger(loop, f"project_dir={broken}")
    assert run.returncode != 0 and "Failed" in run.stdout + run.stderr
    ingest = task_states(loop["api"], flow_run_id)["ingest"]
    assert ingest["type"] == "FAILED" and "stage 'ingest' failed with exit code 2" in ingest["message"]
    assert "no usable image in ingest sources" in ingest["message"] and "255" not in ingest["message"]
    logs = prefect(["flow-run", "logs", flow_run_id], loop["env"]).stdout
    assert "no usable image in ingest sources" in logs and "exit code 2" in logs
    deadline = time.monotonic() + 90  # the server's trigger and action services run every few seconds
    while not any(flow_run_id in m.get("text", "") for m in webhook.received) and time.monotonic() < deadline:
        time.sleep(1)
    text = next((m["text"] for m in webhook.received if flow_run_id in m.get("text", "")), None)
    assert text is not None, f"no notification for {flow_run_id}: {webhook.received}"
    assert "qualiclip-retrain" in text and "Failed" in text


def _canonical(value):
    """A trigger field compared as data: event-name lists as sets, one-item resource lists unwrapped."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@pytest.mark.slow
def test_the_documented_automation_yaml_is_accepted_by_the_server(server, tmp_path):
    """docs/operations.md shows the automation as YAML for `prefect automation create`; the server
    takes it, and it watches the same events as `python -m flows.retrain alert` creates."""
    from flows.retrain import failure_automation

    docs = (ROOT / "docs/operations.md").read_text()
    text = next(b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "prefect.flow-run.Failed" in b)
    env = {**server["env"], "PYTHONPATH": str(ROOT)}
    saved = subprocess.run(
        [
            sys.executable,
            "-c",
            "from prefect.blocks.notifications import "
            "CustomWebhookNotificationBlock as B; "
            "print(B(name='docs', url='http://127.0.0.1:9/x').save('docs-check', overwrite=True))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    block_id = saved.stdout.strip().splitlines()[-1]
    (tmp_path / "automation.yaml").write_text(text.replace("<BLOCK_ID>", block_id))
    created = prefect(["automation", "create", "--from-file", str(tmp_path / "automation.yaml")], server["env"])
    assert created.returncode == 0, created.stdout + created.stderr
    found = rest(server["api"], "automations/filter", {})
    documented = next(a for a in found if a["actions"][0].get("block_document_id") == block_id)
    expected = failure_automation(block_id).model_dump(mode="json")
    for key in ("expect", "match", "match_related", "posture"):
        assert _canonical(documented["trigger"][key]) == _canonical(expected["trigger"][key]), key
    assert documented["actions"][0]["type"] == "send-notification"
    urllib.request.urlopen(
        urllib.request.Request(f"{server['api']}/automations/{documented['id']}", method="DELETE"), timeout=30
    )
