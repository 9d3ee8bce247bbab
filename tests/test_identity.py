"""The identity digests (qualiclip/identity.py): values pinned, and what changes each one.

The pinned values were computed by the code before the digests moved to one module; a digest
that changes makes old train states, shard folders and registry tags stop matching.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import torch

from qualiclip.identity import (
    data_version,
    evaluation_digest,
    image_id,
    index_digest,
    params_hash,
    photo_digest,
    pixel_hash,
    plan_digest,
    replica_digest,
    resume_key,
    rows_digest,
)
from qualiclip.schema import DegradeConfig, EvaluateConfig, ModelConfig, TrainConfig
from qualiclip.shards import FORMAT_VERSION

PIXELS = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
ROWS = [{"id": "a" * 16, "sha256": "0" * 64}, {"id": "b" * 16, "sha256": "1" * 64}]
INDEX = {"shards": [{"name": "shard-000000.tar", "samples": 3, "bytes": 100, "sha256": "a" * 64}]}
GOLDEN = {
    "pixel_hash": "6a0dc24114cb25da826cf175434f19393ea03499438287c007affc73a0ea135f",
    "photo": "65bba8002109e4d0530fec92a1d9b5c2251472ac3da51526e6bc7449147a3d6d",
    "plan": "7bc856757d9160c3ea6b51b438c0ba697c5176ac1649a1c0781edc7dabb6eca6",
    "index": "c8fe0b3f1203e33201d481f71c336e8d1edeb92d51e451c712722369017d1345",
    "params1": "89bf0c49f0e1",
    "params2": "ca331a83fa4a",
    "resume": "a148516ead17a574",
    "replica": "ab392a140bf6488f",
    "rows": "81fa81e658b5",
    "evaluation": "f53b279b38f905ca",
}


def eval_folder(tmp_path, score="0.5"):
    (tmp_path / "synthetic_scores.csv").write_text(f"image,type,level,score\nx,blur,1,{score}\n")
    (tmp_path / "scores_koniq.csv").write_text(f"path,mos,score\na.png,3.5,{score}\n")
    return tmp_path


def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_digests_keep_their_values(tmp_path):
    assert pixel_hash(PIXELS) == GOLDEN["pixel_hash"]
    assert image_id(PIXELS) == GOLDEN["pixel_hash"][:16]
    assert photo_digest(b"qualiclip") == GOLDEN["photo"]
    # pinned at shard format 3, the format when the digests moved here; format 4 (new noise
    # draws) must give another digest, so that degrade rewrites format-3 shards
    assert plan_digest(DegradeConfig(), ROWS, 3) == GOLDEN["plan"]
    assert FORMAT_VERSION == 4 and plan_digest(DegradeConfig(), ROWS, FORMAT_VERSION) != GOLDEN["plan"]
    assert index_digest(INDEX) == GOLDEN["index"]
    assert data_version(INDEX) == GOLDEN["index"][:12]
    assert params_hash(TrainConfig()) == GOLDEN["params1"]
    assert params_hash(ModelConfig(), TrainConfig()) == GOLDEN["params2"]
    assert resume_key(TrainConfig(), ModelConfig(), 2) == GOLDEN["resume"]
    assert replica_digest(linear().state_dict()) == GOLDEN["replica"]
    assert rows_digest([{"b": 1, "a": "x"}, {"a": 2}]) == GOLDEN["rows"]
    assert evaluation_digest(eval_folder(tmp_path), EvaluateConfig()) == GOLDEN["evaluation"]


def test_plan_digest_changes_with_what_the_samples_depend_on_only():
    base = plan_digest(DegradeConfig(), ROWS, FORMAT_VERSION)
    assert plan_digest(DegradeConfig(workers=3), ROWS, FORMAT_VERSION) == base  # workers change no byte
    assert plan_digest(DegradeConfig(seed=1), ROWS, FORMAT_VERSION) != base
    assert plan_digest(DegradeConfig(), ROWS[::-1], FORMAT_VERSION) != base  # plan order
    assert plan_digest(DegradeConfig(), [ROWS[0], {**ROWS[1], "sha256": "2" * 64}], FORMAT_VERSION) != base
    assert plan_digest(DegradeConfig(), ROWS, FORMAT_VERSION + 1) != base


def test_index_digest_and_data_version_change_with_any_shard_entry():
    changed = {"shards": [{**INDEX["shards"][0], "sha256": "b" * 64}]}
    assert index_digest(changed) != index_digest(INDEX)
    assert data_version({**INDEX, "total_samples": 3}) == data_version(INDEX)  # other index fields do not count


def test_resume_key_ignores_what_changes_no_weight():
    base = resume_key(TrainConfig(), ModelConfig(), 1)
    assert resume_key(TrainConfig(log_every=7, threads=1, resume=False), ModelConfig(), 1) == base
    assert resume_key(TrainConfig(lr=2e-3), ModelConfig(), 1) != base
    assert resume_key(TrainConfig(), ModelConfig(), 2) != base


def test_replica_digest_changes_with_any_weight():
    module = linear()
    before = replica_digest(module.state_dict())
    with torch.no_grad():
        module.bias[0] += 1e-6
    assert replica_digest(module.state_dict()) != before


def test_rows_and_evaluation_digests_cover_the_items_not_the_scores(tmp_path):
    assert rows_digest([{"a": 1, "b": 2}]) == rows_digest([{"b": 2, "a": 1}])
    assert rows_digest([{"a": 1}, {"a": 2}]) != rows_digest([{"a": 2}, {"a": 1}])
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    digest = evaluation_digest(eval_folder(one), EvaluateConfig())
    assert evaluation_digest(eval_folder(two, score="0.9"), EvaluateConfig()) == digest
    assert evaluation_digest(one, dataclasses.replace(EvaluateConfig(), batch_size=3)) == digest
    (two / "scores_koniq.csv").write_text("path,mos,score\nb.png,3.5,0.5\n")
    assert evaluation_digest(two, EvaluateConfig()) != digest


def test_identity_loads_no_torch_and_no_shard_code():
    """The ingest stage, the degrade stage and its workers load it: what they load is what DVC
    reruns them for (dvc.yaml deps), and torch costs seconds per worker."""
    code = "import sys, qualiclip.identity; print(sorted(m for m in ('torch', 'qualiclip.shards', 'qualiclip.store') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
