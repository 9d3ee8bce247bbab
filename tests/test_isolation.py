"""The library imports and works with Prefect, DVC and MLflow absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import CLEAN_ENV, make_photos, tiny_params

BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'prefect', 'dvc', 'mlflow'}:
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


@pytest.mark.slow
def test_pipeline_runs_without_orchestrators(tmp_path):
    photos = make_photos(tmp_path / "photos", n=4)
    params = tiny_params([str(photos)], tracking__backend="auto", train__steps=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = BLOCKER + textwrap.dedent("""
        from qualiclip.pipeline import stages
        stages.stage_ingest("params.yaml", "data/ingest")
        stages.stage_degrade("params.yaml", "data/ingest", "data/shards")
        stages.stage_train("params.yaml", "data/shards", "outputs/train")
        m = stages.stage_evaluate("params.yaml", "outputs/train/checkpoint", "data/ingest", "outputs/eval")
        import qualiclip.pipeline.cli, qualiclip.scoring, qualiclip.datasets, qualiclip.distortions  # noqa: F401
        assert not any(n.split('.')[0] in {'prefect', 'dvc', 'mlflow'} for n in sys.modules), 'leaked import'
        print('SRCC', m['synthetic']['srcc'])
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**CLEAN_ENV, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SRCC" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists(), "no tracking store without mlflow"
    assert (tmp_path / "outputs/eval/metrics.json").is_file()
