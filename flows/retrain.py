"""Scheduled retraining: one task per DVC stage (unchanged ones Skipped) → champion promotion →
a markdown report (a Prefect artifact) → ``dvc push`` (when ``schedule.push`` is true).

One command creates the deployment ``qualiclip-retrain/scheduled-retraining`` with the cron
schedule of ``params.yaml`` (``schedule.cron``) and runs it on demand too::

    python -m flows.retrain serve  --project .          # serve it from this process (embedded default)
    python -m flows.retrain deploy --project . --pool qualiclip   # or: a work pool + `prefect worker start`
    python -m flows.retrain alert --webhook-url URL     # a notification on every failed run (an automation)
    prefect deployment run 'qualiclip-retrain/scheduled-retraining' --watch

A workspace lock (``<project>/.qualiclip.lock``) serialises runs: a second trigger waits up to
``schedule.lock_timeout`` seconds, then fails with a message naming the lock. The stages of one
run may take ``schedule.timeout`` seconds together; the stage then running is stopped. A stale
train stage holds a slot of the Prefect global concurrency limit ``schedule.gpu_limit``
(``qualiclip-gpu-<hostname>``, 1 slot), so runs of any project on one GPU host train one at a
time while their other stages overlap (`flows.gpu_slot`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.states import Completed, State

from flows import gpu_slot
from flows.repro import dvc_push, read_metrics, reproduce
from qualiclip.config import ConfigError
from qualiclip.errors import QualiclipError
from qualiclip.pipeline.params import ScheduleConfig, read_params
from qualiclip.pipeline.promotion import HEADLINES, NOT_PROMOTED, Decision, PromotionError, promote_project
from qualiclip.pipeline.report import run_report

FLOW_NAME = "qualiclip-retrain"
LOCK_FILE = ".qualiclip.lock"
REPORT_KEY = "qualiclip-retrain-report"  # the artifact key: its versions are the runs' reports
ALERT_BLOCK = "qualiclip-retrain-alerts"  # the notification block `alert` saves
REPO_ROOT = Path(__file__).resolve().parents[1]  # where `flows.retrain` imports from
GPU_STAGE = "train"  # the stage that holds the GPU for long; evaluate's short scoring takes no slot


class WorkspaceBusy(RuntimeError):
    """Another run holds the project's workspace lock."""


def schedule_config(project_dir: str | Path, params_file: str = "params.yaml") -> ScheduleConfig:
    return read_params(Path(project_dir) / params_file, "schedule")["schedule"]


@contextlib.contextmanager
def workspace_lock(project_dir: str | Path, timeout: float) -> Iterator[Path]:
    """Hold ``<project>/.qualiclip.lock`` (an OS file lock, released if the process dies)."""
    path = Path(project_dir).resolve() / LOCK_FILE
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise WorkspaceBusy(
            f"another qualiclip run holds {path}; waited {timeout:.0f} s — let it finish, "
            f"or raise schedule.lock_timeout in params.yaml"
        ) from None
    try:
        yield path
    finally:
        lock.release()


def _transient(task, task_run, state) -> bool:
    """Retry the registry update on store/network errors, never on a promotion decision error."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (PromotionError, ValueError, FileNotFoundError))


@task(
    name="promote",
    task_run_name="promote",
    retries=2,
    retry_delay_seconds=15,
    retry_condition_fn=_transient,
    cache_policy=NONE,
)
def promote(project_dir: str, params_file: str) -> Decision:
    """Tag the new version with its evaluation; move the champion alias only if it passes the gate
    and beats the champion (`qualiclip.pipeline.promotion`)."""
    decision = promote_project(project_dir, params_file)
    get_run_logger().log(logging.WARNING if decision.outcome == "refused" else logging.INFO, decision.reason)
    return decision


@task(name="report", task_run_name="report", cache_policy=NONE)
def report(decision: Decision, metrics: dict, stages: dict[str, str]) -> str:
    """Publish the run's report as a markdown artifact; returns the markdown."""
    markdown = run_report(decision, metrics, stages)
    create_markdown_artifact(markdown, key=REPORT_KEY, description=f"{FLOW_NAME}: {decision.reason}")
    return markdown


@flow(name=FLOW_NAME, log_prints=True)
def retrain_flow(project_dir: str = ".", params_file: str = "params.yaml", force: bool = False) -> State:
    """Reproduce the pipeline under the workspace lock, promote, report, and with ``schedule.push``
    push the outputs to the default DVC remote; returns the stage states, the metrics and the decision.

    The run ends Completed either way; a refused or kept model names its state "Not promoted"
    (`not_promoted_state`), so the runs list tells the two apart at a glance. A refusal is a
    decision, not a failure: the run does not fail for it.

    A failing stage fails its task with its exit code and last error lines (`StageFailed`), and
    this run. Stages are not retried: a stage failure is deterministic until someone fixes it.
    """
    project_dir = str(Path(project_dir).resolve())
    cfg = schedule_config(project_dir, params_file)
    log = get_run_logger()
    say_not_promoted_in_words()
    gpu_limit = gpu_slot.limit_name(cfg.gpu_limit)  # the host that runs this flow trains
    if gpu_slot.ensure_limit(gpu_limit):
        log.info("created the global concurrency limit '%s' (%d slot)", gpu_limit, gpu_slot.SLOTS)
    log.info("waiting up to %.0f s for the workspace lock", cfg.lock_timeout)
    with workspace_lock(project_dir, cfg.lock_timeout) as lock:
        log.info("holding %s", lock)
        stages = reproduce(project_dir, force, timeout=cfg.timeout, slots={GPU_STAGE: gpu_limit})
        metrics = read_metrics(project_dir)
        decision = promote(project_dir, params_file)
        report(decision, metrics, stages)
        if cfg.push:  # other machines `dvc pull` this run's outputs (docs/scale.md)
            dvc_push(project_dir)
    return final_state(decision, {"stages": stages, "metrics": metrics, "promotion": decision.as_dict()})


class NotPromotedInWords(logging.Filter):
    """Prefect ends a flow run's log with ``Finished in state <state>`` written as a Python call
    (``Not promoted('refused version 2 …', type=COMPLETED)``); say it in words."""

    PREFIX = f"Finished in state {HEADLINES['refused']}("

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.PREFIX):
            record.msg, record.args = "finished: completed, not promoted (the promote task and the report say why)", ()
        return True


def say_not_promoted_in_words() -> None:
    """Install `NotPromotedInWords` on Prefect's flow-run logger, once per process."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, NotPromotedInWords) for f in logger.filters):
        logger.addFilter(NotPromotedInWords())


def final_state(decision: Decision, result: dict) -> State:
    """Completed, named "Not promoted" when the alias stayed where it was (else plain Completed)."""
    if decision.outcome in NOT_PROMOTED:
        return Completed(name=HEADLINES[decision.outcome], message=decision.reason, data=result)
    return Completed(message=decision.reason, data=result)


# ---------------------------------------------------------------------------------------------
# Deployment: `python -m flows.retrain serve|deploy|run`


def _schedule(cfg: ScheduleConfig, params_file: str) -> Cron:
    """The deployment's schedule; `ConfigError` naming the key for a cron string Prefect refuses."""
    try:
        return Cron(cfg.cron, timezone=cfg.timezone)
    except ValueError:
        raise ConfigError(
            f"{params_file}: schedule.cron {cfg.cron!r} is no cron expression — five fields, "
            "minute hour day month weekday, e.g. '0 3 * * *' (every day at 03:00)"
        ) from None


def _importable_here() -> None:
    """Flow runs import ``flows.retrain`` from the repository root: make it cwd and PYTHONPATH."""
    os.chdir(REPO_ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def serve(project_dir: str, params_file: str = "params.yaml") -> None:
    """Create the scheduled deployment and execute its runs from this process until stopped."""
    cfg = schedule_config(project_dir, params_file)
    schedule = _schedule(cfg, params_file)
    _ensure_gpu_limit(cfg)
    params = {"project_dir": str(Path(project_dir).resolve()), "params_file": params_file}
    _importable_here()
    retrain_flow.serve(
        name=cfg.deployment,
        schedules=[schedule],
        parameters=params,
        description="dvc repro, then promote the new model if it beats the champion",
    )


def deploy(project_dir: str, pool: str, params_file: str = "params.yaml") -> None:
    """Create the deployment on work pool ``pool`` (a ``process`` pool is created if absent) and
    this host's GPU concurrency limit (if absent); the workers of the pool run it."""
    cfg = schedule_config(project_dir, params_file)
    schedule = _schedule(cfg, params_file)
    _ensure_pool(pool)
    _ensure_gpu_limit(cfg)
    retrain_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/retrain.py:retrain_flow").deploy(
        name=cfg.deployment,
        work_pool_name=pool,
        schedules=[schedule],
        parameters={"project_dir": str(Path(project_dir).resolve()), "params_file": params_file},
        job_variables={"working_dir": str(REPO_ROOT), "env": {"PYTHONPATH": str(REPO_ROOT)}},
        ignore_warnings=True,
    )


def _ensure_gpu_limit(cfg: ScheduleConfig) -> None:
    """This host's limit, made at deployment so `prefect gcl ls` shows it before the first run.
    A worker on another host creates its own when its first run starts."""
    name = gpu_slot.limit_name(cfg.gpu_limit)
    created = gpu_slot.ensure_limit(name)
    print(
        f"{'created' if created else 'found'} global concurrency limit '{name}' — one training at a time on this host"
    )


def _ensure_pool(pool: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"created process work pool '{pool}' — start a worker: prefect worker start --pool {pool}")


# ---------------------------------------------------------------------------------------------
# Failure notification: `python -m flows.retrain alert --webhook-url URL`


def failure_automation(block_document_id: str) -> Automation:
    """An automation that sends a notification through the block each time a run of this flow
    fails, crashes or times out (docs/operations.md shows the same as YAML)."""
    return Automation(
        name=f"{FLOW_NAME} failed",
        description="Notify when a scheduled or manual retraining run does not complete",
        trigger=EventTrigger(
            posture=Posture.Reactive,
            threshold=1,
            within=0,
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject=f"{FLOW_NAME} run {{{{ flow_run.name }}}} {{{{ flow_run.state.name }}}}",
                body="Flow run {{ flow_run.name }} ({{ flow_run.id }}) of "
                + FLOW_NAME
                + " ended {{ flow_run.state.name }}: {{ flow_run.state.message }}",
            )
        ],
    )


def create_failure_alert(webhook_url: str) -> Automation:
    """Save a webhook notification block (JSON ``{"text": subject + body}``, the Slack/Teams/
    Mattermost incoming-webhook shape) and the automation that uses it; replaces earlier ones."""
    block = CustomWebhookNotificationBlock(
        name=ALERT_BLOCK, url=webhook_url, json_data={"text": "{{subject}}\n{{body}}"}
    )
    block_id = block.save(ALERT_BLOCK, overwrite=True)
    automation = failure_automation(str(block_id))
    with contextlib.suppress(ValueError):  # none yet
        Automation.read(name=automation.name).delete()
    automation.create()
    return automation


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m flows.retrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=["serve", "deploy", "run", "alert"])
    p.add_argument("--project", default=".", help="the DVC project to retrain (default: .)")
    p.add_argument("--params", default="params.yaml", help="params file inside the project")
    p.add_argument("--pool", default="qualiclip", help="work pool for deploy (default: qualiclip)")
    p.add_argument("--force", action="store_true", help="run: rerun every stage (dvc repro --force)")
    p.add_argument("--webhook-url", help='alert: where failed runs are announced (JSON {"text": ...})')
    args = p.parse_args(argv)
    try:
        _run_command(p, args)
    except QualiclipError as exc:  # a user error: one line, no traceback
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_command(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "alert":
        if not args.webhook_url:
            p.error("alert needs --webhook-url URL")
        print(f"created automation '{create_failure_alert(args.webhook_url).name}' → {args.webhook_url}")
    elif args.command == "serve":
        serve(args.project, args.params)
    elif args.command == "deploy":
        deploy(args.project, args.pool, args.params)
    else:
        print(retrain_flow(str(Path(args.project).resolve()), args.params, args.force)["promotion"]["reason"])


if __name__ == "__main__":
    main()
