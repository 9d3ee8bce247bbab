"""Which pipeline execution a stage run belongs to: the id its stage runs share in MLflow.

The stage runs of one execution share the tag ``qualiclip.execution_id`` and hang under one parent
run that lasts as long as the execution (docs/operations.md, "Seeing the runs").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

EXECUTION_ENV = "QUALICLIP_EXECUTION_ID"  # set by the Prefect flows to their flow-run id
EXECUTION_NAME_ENV = "QUALICLIP_EXECUTION_NAME"  # ... and to "<flow name>/<flow-run name>", as the Prefect UI shows it
DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for every stage command it runs


@dataclass(frozen=True)
class Execution:
    """One pipeline execution: the id its stage runs share, what ran (a name a person knows it
    by: the Prefect flow run, the dvc command line; the id when there is none), and when it
    started (epoch seconds; None when only the first stage run can tell)."""

    id: str
    started: float | None = None
    name: str = ""

    def title(self, now: float) -> str:
        """``<name> <start, local time to the second>``: what ran and when (``now`` if the start is unknown)."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started or now))
        return f"{self.name or self.id} {when}"


def current_execution() -> Execution | None:
    """The pipeline execution this process runs a stage of, or None for a stage run by hand.

    ``QUALICLIP_EXECUTION_ID`` when set (the Prefect flows set their flow-run id, and the run's
    name in ``QUALICLIP_EXECUTION_NAME``). Else, under DVC (which sets ``DVC_ROOT`` for its stage
    commands), the ``dvc`` process that runs the stage: one ``dvc repro`` or ``dvc exp run`` is
    one process, and its pid with its start time is unique on the machine, so
    ``dvc-<pid>-<start>``; its name is its command line (``dvc repro``), its start time the
    execution's.
    """
    if os.environ.get(EXECUTION_ENV):
        return Execution(os.environ[EXECUTION_ENV], name=os.environ.get(EXECUTION_NAME_ENV, ""))
    if not os.environ.get(DVC_ROOT_ENV):
        return None
    dvc = next((p for p in psutil.Process().parents() if _dvc_argv(p)), None)
    if dvc is None:
        return None
    started = dvc.create_time()
    return Execution(f"dvc-{dvc.pid}-{int(started * 1000)}", started, " ".join(_dvc_argv(dvc))[:80])


def _dvc_argv(process: psutil.Process) -> list[str]:
    """``["dvc", "repro", ...]`` for ``dvc ...`` or ``python [-m] dvc ...`` (the DVC command line,
    whatever interpreter runs it); [] for any other process."""
    try:
        argv = process.cmdline()
    except psutil.Error:  # gone or not ours to read: not the dvc we look for
        return []
    at = next(
        (i for i, arg in enumerate(argv[:3]) if not arg.startswith("-") and Path(arg).name in ("dvc", "dvc.exe")), None
    )
    return [] if at is None else ["dvc", *argv[at + 1 :]]
