"""A repro of the DVC pipeline as a Prefect flow (``qualiclip-repro``, `repro_flow`): one task per
stage, in ``dvc dag`` order; DVC decides.

    order     `dvc dag --dot`                         (dvc.yaml stays the one definition of the DAG)
    each      `dvc status <stage>` ── nothing changed ─▶ task state Skipped (type COMPLETED)
                        └─ stale, or force ─▶ `dvc repro --single-item <stage>`

So the Prefect UI shows each stage's state, duration and log. A stage's output lines reach the
task's log at their own level (ERROR, WARNING, else INFO) without colour codes; its progress
bars are off, since its output is a pipe, not a terminal. A failing stage fails its task with
the stage's own exit code and last error lines (`StageFailed`), and no later stage runs. The
flow-run id becomes the execution id that groups the stage runs in MLflow.
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import gpu_slot
from qualiclip.pipeline.execution import EXECUTION_ENV, EXECUTION_NAME_ENV
from qualiclip.pipeline.paths import stage_paths

SKIPPED = "Skipped"  # the name of a stage task's state when DVC found nothing to do
UNCHANGED = "dependencies, params and outputs unchanged"  # why, in its message
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
ERROR_LINE = re.compile(
    r"^(ERROR|CRITICAL)\b|^[\w.-]+(?: [\w-]+)?: error:|^Traceback \(most recent call last\)"
    r"|^[\w.]*(Error|Exception)\b"
)
WARNING_LINE = re.compile(r"^WARNING\b|^\S+:\d+: \w*Warning: ")
EXIT_CODE = re.compile(r"exited with (-?\d+)")  # DVC's words for the stage command's exit status
# What `dvc repro` tells a person at a terminal after every run, whatever the settings; the flow
# pushes itself (schedule.push), so in a task's log it is noise.
DVC_ADVICE = {"Use `dvc push` to send your updates to remote storage."}


class StageFailed(RuntimeError):
    """A stage's command failed; the message carries its exit code and last error lines."""


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")  # the dvc beside this interpreter, not a stray one
    return str(exe) if exe.exists() else "dvc"


def _env() -> dict[str, str]:
    """The stages' environment: the pipeline id for MLflow, this interpreter's bin first on PATH."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        EXECUTION_ENV: str(flow_run.id or os.environ.get(EXECUTION_ENV, "")),
        # the MLflow parent run is named as the Prefect UI names the flow run
        EXECUTION_NAME_ENV: (
            f"{flow_run.flow_name}/{flow_run.name}" if flow_run.id else os.environ.get(EXECUTION_NAME_ENV, "")
        ),
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc_query(project_dir: str, *args: str) -> str:
    """The stdout of a read-only dvc command (``dag``, ``status``); `StageFailed` if it fails."""
    proc = subprocess.run([_dvc(), *args], cwd=project_dir, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def stage_order(project_dir: str) -> list[str]:
    """The project's stages, upstream first, as ``dvc dag`` draws them."""
    dot = dvc_query(project_dir, "dag", "--dot")
    needs: dict[str, set[str]] = {name: set() for name in re.findall(r'^"([^"]+)";$', dot, re.M)}
    for upstream, downstream in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M):
        needs[downstream].add(upstream)
    return list(graphlib.TopologicalSorter(needs).static_order())


def stage_changes(project_dir: str, stage: str) -> list:
    """What ``dvc status`` finds changed for ``stage`` alone ([] when it is up to date)."""
    status = json.loads(dvc_query(project_dir, "status", "--json", stage) or "{}")
    return [change for changes in status.values() for change in changes]


def describe_changes(changes: list, shown: int = 4) -> str:
    """`stage_changes` in one short line: ``changed deps: photos (modified), params.yaml (modified)
    and 12 more; changed outs: data/ingest (deleted)`` (data and params before code)."""
    parts = []
    for change in changes:
        for kind, paths in change.items() if isinstance(change, dict) else [(change, None)]:
            if not isinstance(paths, dict):
                parts.append(kind if paths is None else f"{kind}: {paths}")
                continue
            names = sorted(paths, key=lambda path: path.startswith("qualiclip/"))
            listed = ", ".join(f"{path} ({paths[path]})" for path in names[:shown])
            parts.append(f"{kind}: {listed}" + (f" and {len(names) - shown} more" if len(names) > shown else ""))
    return "; ".join(parts)


def line_level(line: str, previous: int) -> int:
    """The log level of one output line; indented lines (traceback frames, a warning's source
    line) continue the line before them."""
    if line[:1].isspace():
        return previous
    if ERROR_LINE.search(line):
        return logging.ERROR
    return logging.WARNING if WARNING_LINE.search(line) else logging.INFO


def clean(raw: str) -> str:
    """One output line without colour codes or a progress bar's redrawn prefix."""
    return ANSI.sub("", raw.rstrip("\n").rsplit("\r", 1)[-1]).rstrip()


def run_logged(cmd: list[str], cwd: str, log) -> tuple[int, list[tuple[int, str]]]:
    """Run ``cmd``, each output line to ``log`` at its level; (exit code, the last 40 lines).

    Lines are read on a helper thread, so a timeout or cancellation raised in this thread takes
    effect at once even while the command is silent; the command's process group is then
    stopped, never left running behind the flow.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="backslashreplace",
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: list[tuple[int, str]] = []
    level = logging.INFO
    try:
        while (raw := _next_line(lines)) is not None:
            if raw == "" or not (line := clean(raw)) or line in DVC_ADVICE:
                continue
            level = line_level(line, level)
            log.log(level, "%s", line)
            tail = (tail + [(level, line)])[-40:]
        return proc.wait(), tail
    finally:
        stop_process_group(proc)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # the end


def _next_line(lines: queue.Queue) -> str | None:
    """The next output line, None at its end, "" after a second of silence (to stay interruptible)."""
    with contextlib.suppress(queue.Empty):
        return lines.get(timeout=1.0)
    return ""


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), SIGKILL it if
    it lingers ``grace`` seconds; no-op when it has ended."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class SkippedInWords(logging.Filter):
    """Prefect ends a task's log with ``Finished in state <state>``, the state written as a Python
    call (``Skipped('ingest: …', type=COMPLETED)``); for a stage DVC found up to date, say so in words."""

    PREFIX = f"Finished in state {SKIPPED}("

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.PREFIX):
            record.msg, record.args = f"skipped: {UNCHANGED} (dvc status), nothing to run", ()
        return True


def say_skipped_in_words() -> None:
    """Install `SkippedInWords` on Prefect's task-run logger, once per process."""
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, SkippedInWords) for f in logger.filters):
        logger.addFilter(SkippedInWords())


def failure_message(stage: str, dvc_code: int, tail: list[tuple[int, str]]) -> str:
    """The stage's own exit code (DVC itself exits 255) and its last error lines (or last lines)."""
    codes = [int(m.group(1)) for _, line in tail if (m := EXIT_CODE.search(line))]
    errors = [line for level, line in tail if level >= logging.ERROR][-10:] or [line for _, line in tail][-10:]
    code = f"exit code {codes[-1]}" if codes else f"dvc exit code {dvc_code}"
    return f"stage '{stage}' failed with {code}:\n" + "\n".join(errors)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NONE)
def dvc_stage(
    project_dir: str, stage: str, force: bool = False, slot: str | None = None, slot_timeout: float | None = None
):
    """Reproduce one stage if DVC finds it stale (always when ``force``); Skipped otherwise.

    ``slot``: a global concurrency limit the stage holds a slot of while it runs (not when
    skipped), waiting up to ``slot_timeout`` s for it (`flows.gpu_slot.held`).
    """
    log = get_run_logger()
    if not force:
        changes = stage_changes(project_dir, stage)
        if not changes:
            return Completed(name=SKIPPED, message=f"{stage}: {UNCHANGED}", data={"stage": stage, "ran": False})
        log.info("%s is stale: %s", stage, describe_changes(changes))
    cmd = [_dvc(), "repro", "--single-item", *(["--force"] if force else []), stage]
    with gpu_slot.held(slot, slot_timeout) if slot else contextlib.nullcontext():
        log.info("running %s in %s", " ".join(cmd[1:]), project_dir)
        code, tail = run_logged(cmd, project_dir, log)
    if code != 0:
        raise StageFailed(failure_message(stage, code, tail))
    return {"stage": stage, "ran": True}


def reproduce(
    project_dir: str, force: bool = False, timeout: float | None = None, slots: dict[str, str] | None = None
) -> dict[str, str]:
    """Run every stage as a `dvc_stage` task, upstream first; ``{stage: state name}``.

    ``timeout``: seconds for all stages together (a wait for a slot included); the stage running
    when it ends is stopped and its task ends TimedOut. ``slots``: stage → the global concurrency
    limit it holds a slot of while it runs. The first stage that does not complete raises its
    error here.
    """
    say_skipped_in_words()
    deadline = None if timeout is None else time.monotonic() + timeout
    states: dict[str, str] = {}
    for stage in stage_order(project_dir):
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        slot = (slots or {}).get(stage)
        state = dvc_stage.with_options(timeout_seconds=left)(project_dir, stage, force, slot, left, return_state=True)
        states[stage] = state.name
        if not state.is_completed():
            state.result()  # raises the stage's StageFailed, or the TimeoutError of a timed-out stage
    return states


@task(name="read-metrics", task_run_name="read-metrics", cache_policy=NONE)
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
    proc = subprocess.run([_dvc(), "push"], cwd=project_dir, env=_env(), capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise PushFailed(f"dvc push failed (exit {proc.returncode}) in {project_dir}:\n{output[-3000:]}")
    get_run_logger().info("dvc push: %s", output.splitlines()[-1] if output else "done")


@flow(name="qualiclip-repro", log_prints=True)
def repro_flow(project_dir: str = ".", force: bool = False) -> dict:
    """Reproduce the DVC pipeline, one task per stage, and return the evaluation metrics."""
    reproduce(project_dir, force)
    return read_metrics(project_dir)


if __name__ == "__main__":
    repro_flow()
