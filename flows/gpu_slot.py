"""One training per GPU host: a Prefect global concurrency limit (GCL) per host, limit 1.

    schedule.gpu_limit  "qualiclip-gpu-{host}"  →  the limit "qualiclip-gpu-<hostname>"
    a stale train stage  ── waits for a slot ──▶  runs holding it  ──▶  releases it

The limit lives on the Prefect server, so it holds across processes and projects: two
deployments, two work-pool workers or a served deployment and a manual run on one host share
it; ingest, degrade and evaluate of those runs still overlap. A stage that DVC finds up to date
takes no slot. The slot is a lease the holding process renews: if the process dies, the slot
frees itself when the lease ends (``LEASE_SECONDS``).

The limit is created with 1 slot when absent (`ensure_limit`: on ``deploy``/``serve`` and by the
flow before it asks for a slot), never changed when present, so an operator's
``prefect gcl update <name> --limit 2`` (two trainings fit) or ``prefect gcl disable <name>`` stays.
Slots are taken with ``strict=True``: a limit that vanished between the two is an error naming
it, never a silently unguarded training.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

SLOTS = 1  # trainings at once per host, when the limit is created
LEASE_SECONDS = 300  # a dead holder's slot frees itself after this (Prefect renews it while alive)


def limit_name(template: str, host: str | None = None) -> str:
    """``template`` (params.yaml ``schedule.gpu_limit``) with ``{host}`` replaced by this host's name."""
    return template.replace("{host}", host or socket.gethostname())


def ensure_limit(name: str) -> bool:
    """Create the global concurrency limit ``name`` with `SLOTS` slot(s) unless it exists; True
    if it was created. An existing limit keeps its size and state (an operator's choice)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=SLOTS))
        except ObjectAlreadyExists:  # another run created it just now
            return False
        return True


@contextlib.contextmanager
def held(name: str, timeout: float | None = None) -> Iterator[None]:
    """Hold one slot of limit ``name`` for the block, waiting up to ``timeout`` s (None: no bound)
    for it; `TimeoutError` then. Logs the wait, so a queued training shows why it has not begun.

    The words name no GPU: the limit serialises the trainings of a host, with or without one.
    """
    log = get_run_logger()
    log.info("waiting for a slot of the global concurrency limit '%s' (one training at a time on this host)", name)
    t0 = time.monotonic()
    with concurrency(name, occupy=1, timeout_seconds=timeout, lease_duration=LEASE_SECONDS, strict=True):
        log.info("holding a slot of '%s' after %.1f s", name, time.monotonic() - t0)
        yield  # the slot is released with the block; the task's end says when
