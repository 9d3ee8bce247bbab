"""The benchmarks' one home for timing: CPU and wall clocks, the machine's load, one-thread runs.

Every figure a benchmark prints is measured with these, so figures of different benchmarks mean
the same thing. CPU time is the work done, whatever the neighbours on a shared machine do; wall
time is printed beside it, with the load average, because wall time depends on them. Run a
benchmark as ``python benchmarks/<name>.py``: this folder is then on the import path.
"""

from __future__ import annotations

import os
import resource
import time

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")


def load() -> str:
    """The 1-minute load average and the core count, to print beside every figure."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its reaped children (pool workers that ended)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_everywhere() -> float:
    """`cpu_seconds` plus every live descendant (pool and Dask workers, servers): a run's cost
    whichever process did the work."""
    import psutil

    live = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            live += t.user + t.system
        except psutil.Error:  # ended meanwhile: reaped, its time is in RUSAGE_CHILDREN
            pass
    return cpu_seconds() + live


def timed(fn, sync=None) -> tuple[float, float, object]:
    """(CPU s of this thread's process, wall s, result) of one call; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before the clocks stop."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    return time.process_time() - c, time.perf_counter() - w, out


def timed_with_children(fn) -> tuple[dict, object]:
    """({"wall_s", "cpu_s"}, result) of one call, the CPU of finished child processes included."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    out = fn()
    return {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}, out


def single_thread() -> None:
    """One thread everywhere (OpenMP, MKL, OpenBLAS, OpenCV, torch), before their pools start."""
    for var in THREAD_VARS:
        os.environ[var] = "1"
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
