"""The noise issue 23 found in every run log: lines a person reads past, or cannot act on.

`noise_lines` picks them out of a `dvc repro` log or a Prefect run's log, so a test can ask for
none; `python tests/noise.py LOG` counts them in a saved log.
"""

from __future__ import annotations

import re
import sys

NOISE = {
    # DVC's hint after every `dvc repro` (a stage task runs one): git add / autostage / dvc push
    "dvc git hint": re.compile(
        r"To track the changes with git|To enable auto staging|dvc config core\.autostage"
        r"|\bgit add .*dvc\.lock"
    ),
    # ... and its last line, which `dvc repro` prints once at its end whatever the settings
    "dvc push hint": re.compile(r"Use `dvc push` to send your updates"),
    # MLflow's schema hint for a dataset's integer columns
    "mlflow integer-column warning": re.compile(r"integer column", re.I),
    # MLflow's own registration lines, beside the stage's "registered <name> version <n>"
    "mlflow registration echo": re.compile(
        r"Successfully registered model|Created version '|already exists\. Creating a new version"
    ),
    # MLflow's INFO chatter: the input example checked when a model is logged; a new store's tables
    "mlflow info chatter": re.compile(
        r"Validating input example|Creating initial MLflow database tables|Updating database tables|Waiting up to \d+ seconds for model version"
    ),
    # open_clip's warning when a model is built before its weights are loaded
    "random-init warning": re.compile(r"No pretrained weights loaded|initialized randomly"),
    # raw floats: a dict of 17-digit losses
    "unrounded number": re.compile(r"\d\.\d{9,}"),
    "1 steps": re.compile(r"\b1 steps\b"),
    # counters that are all zero, printed anyway
    "zero counters": re.compile(r"(?:['\"]?\w+['\"]?: 0\b.*){3,}"),
    # a GPU named on a host that has none
    "GPU on a CPU host": re.compile(r"\bGPU\b"),
    # a Prefect state written as a Python call
    "state repr": re.compile(r"Skipped\(|type=COMPLETED"),
}


def noise_lines(text: str, allow: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(kind, line) for every line of ``text`` that is noise (a line counts once), but for the kinds in ``allow``."""
    found = []
    for line in text.splitlines():
        kind = next((k for k, pattern in NOISE.items() if pattern.search(line)), None)
        if kind and kind not in allow:
            found.append((kind, line))
    return found


if __name__ == "__main__":
    text = open(sys.argv[1], errors="replace").read()
    lines = noise_lines(text)
    for kind, line in lines:
        print(f"{kind:32} {line[:150]}")
    print(f"{len(lines)} noise lines of {len(text.splitlines())}")
