"""The layering is a check, not a convention: the import-linter contracts of pyproject.toml hold,
and each one fails when a forbidden import is added (docs/architecture.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import CLEAN_ENV, bin_path

ROOT = Path(__file__).resolve().parents[1]

# One forbidden import per rule: (file, line appended, the chain lint-imports must report).
VIOLATIONS = [
    ("qualiclip/model.py", "from qualiclip.pipeline import cli", "qualiclip.model -> qualiclip.pipeline.cli"),
    ("qualiclip/pipeline/stages.py", "import flows.stage_flows", "qualiclip.pipeline.stages -> flows.stage_flows"),
    ("qualiclip/train.py", "import mlflow", "qualiclip.train -> mlflow"),
    ("qualiclip/scoring.py", "import prefect", "qualiclip.scoring -> prefect"),
    ("qualiclip/ingest.py", "import dvc.repo", "qualiclip.ingest -> dvc"),
    ("qualiclip/explain.py", "import argparse", "qualiclip.explain -> argparse"),
    ("qualiclip/model.py", "import unittest.mock", "qualiclip.model -> unittest"),
    ("qualiclip/sampling.py", "import torch", "qualiclip.sampling -> torch"),
    ("qualiclip/metrics.py", "from . import evaluate", ".metrics -> .evaluate"),  # a cycle
    ("qualiclip/shards.py", "from . import loader", "qualiclip.shards -> qualiclip.loader"),  # up a layer
]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [bin_path("lint-imports"), "--no-cache"],
        cwd=cwd,
        env={**CLEAN_ENV, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 6 kept, 0 broken." in proc.stdout


def test_every_contract_breaks_on_a_forbidden_import(tmp_path):
    """A copy of the tree with one forbidden import per rule: every contract reports it."""
    for name in ("qualiclip", "flows"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for file, line, _ in VIOLATIONS:
        with open(tmp_path / file, "a") as f:
            f.write(f"\n{line}  # a forbidden import\n")
    proc = lint_imports(tmp_path)
    out = proc.stdout
    assert proc.returncode == 1, out[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 0 kept, 6 broken." in out, out[-4000:]
    for _, _, chain in VIOLATIONS:
        assert chain in out, chain
