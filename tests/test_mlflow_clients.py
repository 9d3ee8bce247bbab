"""Clients of a team's MLflow server as docs/scale.md §4 sets them up (issue 27).

- A client that names the server by a host name missing from its ``--allowed-hosts`` gets HTTP 403
  from MLflow 3; the project's commands must say so in one line naming the flag, and a listed name
  must work. The server runs on 127.0.0.1 (loopback only); the host names are resolved to
  127.0.0.1 in this test process only, so the requests carry a real ``Host: <name>:<port>``.
- A project whose stages already ran against its embedded store, switched to the server by
  ``MLFLOW_TRACKING_URI``: `dvc repro` has nothing to rerun, and the commands the doc gives must put
  the model on the server and promote it there.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest
import yaml
from conftest import ROOT, bin_path, make_dvc_project, make_photos, promoting_params, run
from servers import free_port, start_logged, wait_http

from flows.repro import stop_process_group

pytestmark = pytest.mark.slow

ALLOWED, REFUSED = "mlflow.qualiclip.test", "other.qualiclip.test"  # .test: a reserved name, never on a network
PARAMS = promoting_params()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[int]:
    """``mlflow server`` on 127.0.0.1 that allows ``ALLOWED:<port>`` and loopback; yields its port."""
    folder, port = tmp_path_factory.mktemp("mlflow-named"), free_port()
    cmd = [
        bin_path("mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--allowed-hosts",
        f"{ALLOWED}:{port},127.0.0.1:{port}",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start_logged(cmd, folder / "server.log", env, folder)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, folder / "server.log", "mlflow server")
        yield port
    finally:
        stop_process_group(proc)


@pytest.fixture
def by_name(monkeypatch) -> None:
    """``*.qualiclip.test`` resolves to 127.0.0.1 in this process (requests keeps the name as Host)."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        return real("127.0.0.1" if str(host).endswith(".qualiclip.test") else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def test_a_host_name_missing_from_allowed_hosts_is_one_line_naming_the_flag(server, by_name, monkeypatch, tmp_path):
    from qualiclip.pipeline.tracking_mlflow import MlflowTracker, TrackingServerError, registry_client

    fix = f"--allowed-hosts {REFUSED}:{server}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{REFUSED}:{server}")
    with pytest.raises(TrackingServerError, match=f"refused the host name '{REFUSED}:{server}'.*`{fix}`"):
        MlflowTracker("qualiclip-hosts", None)  # what every stage opens first
    with pytest.raises(TrackingServerError, match=f"`{fix}`"):
        registry_client(tmp_path)  # promote, score and explain with a models:/ URI

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{ALLOWED}:{server}")  # listed: it works
    tracker = MlflowTracker("qualiclip-hosts", None)
    assert registry_client(tmp_path).get_experiment(tracker.experiment_id).name == "qualiclip-hosts"


def switch_commands() -> str:
    """The commands docs/scale.md gives for switching a project that has already run."""
    text = (ROOT / "docs/scale.md").read_text()
    section = text.split("**Switching a project that has already run.**", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return "\n".join(line for line in block.splitlines() if not line.startswith("export "))


def test_switching_an_up_to_date_project_to_the_server(server, tmp_path, by_name, monkeypatch, capsys):
    url = f"http://127.0.0.1:{server}"
    project = make_dvc_project(tmp_path / "project", PARAMS)
    make_photos(project / "photos", n=6)
    run([bin_path("dvc"), "repro"], project)  # the embedded store: the project's mlflow.db
    shards_before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["degrade"]["outs"]

    idle = run([bin_path("dvc"), "repro"], project, MLFLOW_TRACKING_URI=url)
    assert "Running stage" not in idle.stdout, idle.stdout  # the switch alone reruns (and logs) nothing
    refused = run([bin_path("qualiclip"), "promote"], project, check=False, MLFLOW_TRACKING_URI=url)
    assert refused.returncode == 2 and "holds no version 1 of 'qualiclip'" in refused.stderr, refused.stderr

    commands = switch_commands()
    done = run(["bash", "-ec", commands], project, MLFLOW_TRACKING_URI=url)
    assert "Running stage 'train'" in done.stdout and "Running stage 'evaluate'" in done.stdout, done.stdout
    assert "Running stage 'degrade'" not in done.stdout, done.stdout  # the shards stay
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["degrade"]["outs"] == shards_before

    from mlflow import MlflowClient

    client = MlflowClient(url)
    registered = json.loads((project / "outputs/train/registered_model.json").read_text())
    assert client.get_registered_model("qualiclip").aliases == {"champion": str(registered["version"])}
    stages = sorted(
        r.data.tags["qualiclip.stage"]
        for r in client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "tags.`qualiclip.kind` = 'stage'"
        )
    )
    assert stages == ["evaluate", "train"], stages
    assert "Data and pipelines are up to date" in run([bin_path("dvc"), "status"], project).stdout

    # the same project through host names: a refused one is one line (exit 2), the allowed one works
    from qualiclip.pipeline import cli

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{REFUSED}:{server}")
    capsys.readouterr()
    assert cli.main(["promote"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qualiclip promote: error: the MLflow server at "), err
    assert f"`--allowed-hosts {REFUSED}:{server}`" in err and "Traceback" not in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{ALLOWED}:{server}")
    assert cli.main(["promote", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "unchanged"
