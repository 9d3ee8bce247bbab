"""Which pipeline execution a stage run belongs to: the id its stage runs share in MLflow.

The stage runs of one execution share the tag ``qualiclip.pipeline_id`` and hang under one parent
run that lasts as long as the execution (docs/operations.md, "Seeing the runs").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

PIPELINE_ENV = "QUALICLIP_PIPELINE_ID"  # set by the Prefect flows to their flow-run id
DVC_ROOT_ENV = "DVC_ROOT"               # set by DVC for every stage command it runs


@dataclass(frozen=True)
class Execution:
    """One pipeline execution: the id its stage runs share, and when it started (epoch seconds;
    None when only the first stage run can tell)."""

    id: str
    started: float | None = None


def current_execution() -> Execution | None:
    """The pipeline execution this process runs a stage of, or None for a stage run by hand.

    ``QUALICLIP_PIPELINE_ID`` when set (the Prefect flows set their flow-run id). Else, under DVC
    (which sets ``DVC_ROOT`` for its stage commands), the ``dvc`` process that runs the stage:
    one ``dvc repro`` or ``dvc exp run`` is one process, and its pid with its start time is
    unique on the machine, so ``dvc-<pid>-<start>``. Its start time is the execution's.
    """
    if os.environ.get(PIPELINE_ENV):
        return Execution(os.environ[PIPELINE_ENV])
    if not os.environ.get(DVC_ROOT_ENV):
        return None
    dvc = next((p for p in psutil.Process().parents() if _is_dvc(p)), None)
    if dvc is None:
        return None
    started = dvc.create_time()
    return Execution(f"dvc-{dvc.pid}-{int(started * 1000)}", started)


def _is_dvc(process: psutil.Process) -> bool:
    """``dvc ...`` or ``python [-m] dvc ...``: the DVC command line, whatever interpreter runs it."""
    try:
        argv = process.cmdline()[:3]
    except psutil.Error:  # gone or not ours to read: not the dvc we look for
        return False
    return any(Path(arg).name in ("dvc", "dvc.exe") for arg in argv if not arg.startswith("-"))
