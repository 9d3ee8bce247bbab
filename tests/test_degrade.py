"""The degrade stage: determinism, atomic resume after SIGKILL, plan changes, the index, the flow."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CLEAN_ENV, ROOT, degrade_cli, kill_midway_then_rerun

from qualiclip.config import ConfigError, build_config
from qualiclip.degrade import DegradeConfig, DegradeError, run_degrade
from qualiclip.ingest import IngestError
from qualiclip.sampling import SampleConfig
from qualiclip.shards import decode_crops

TYPES = ("gaussian_blur", "white_noise", "jpeg", "brighten")
CFG = DegradeConfig(variants=3, samples_per_shard=2, workers=1, sample=SampleConfig(crop=32, distortions=TYPES))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` (shards, index.json, plan.json)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bytes_identical_for_1_and_2_workers_and_across_runs(ingest_dir, tmp_path):
    a = run_degrade(CFG, ingest_dir, tmp_path / "a", progress=False)
    b = run_degrade(replace(CFG, workers=2), ingest_dir, tmp_path / "b", progress=False)
    run_degrade(CFG, ingest_dir, tmp_path / "c", progress=False)
    assert (a.shards, a.samples, a.resumed_shards) == (6, 12, 0)
    assert b.samples == a.samples and b.bytes == a.bytes
    ref = digests(tmp_path / "a")
    assert {"index.json", "plan.json", "shard-000005.tar"} <= set(ref)
    assert digests(tmp_path / "b") == ref
    assert digests(tmp_path / "c") == ref


def test_index_lists_names_counts_and_checksums(ingest_dir, tmp_path):
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == [f"shard-{k:06d}.tar" for k in range(6)]
    for s in index["shards"]:
        path = tmp_path / s["name"]
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert s["bytes"] == path.stat().st_size
        with tarfile.open(path) as tar:
            assert len([m for m in tar.getnames() if m.endswith(".json")]) == s["samples"] == 2
    assert index["total_samples"] == 12 and index["encoding"] == CFG.encoding and "workers" not in index["config"]


def test_sample_holds_2xL_crops_and_its_provenance(ingest_dir, tmp_path):
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert {m.mode for m in tar.getmembers()} == {0o444} and {m.mtime for m in tar.getmembers()} == {0}
    key = sorted(members)[0].split(".")[0]
    sample = {"__key__": key, **{n.split(".", 1)[1]: v for n, v in members.items() if n.startswith(key)}}
    meta = json.loads(sample["json"])
    assert {"source_id", "variant", "seed", "boxes", "composition", "levels", "crc32"} <= set(meta)
    assert meta["levels"] == [1, 2, 3, 4, 5] and meta["composition"][0] in TYPES
    (y0, x0, _, _), (y1, x1, _, _) = meta["boxes"]
    assert abs(y1 - y0) <= 16 and abs(x1 - x0) <= 16  # crop·(1 − min_overlap)
    crops = decode_crops(sample)
    assert crops.shape == (2, 5, 32, 32, 3) and crops.dtype == np.uint8


def test_plan_change_wipes_stale_shards_and_same_plan_resumes(ingest_dir, tmp_path):
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    first = digests(tmp_path)
    (tmp_path / "index.json").unlink()  # an interrupted run: the index is written last
    (tmp_path / "shard-000003.tar").unlink()
    redo = run_degrade(replace(CFG, workers=2), ingest_dir, tmp_path, progress=False)
    assert redo.resumed_shards == 5 and digests(tmp_path) == first  # workers is not part of the plan
    fewer = run_degrade(replace(CFG, variants=2, seed=1), ingest_dir, tmp_path, progress=False)
    assert (fewer.shards, fewer.resumed_shards) == (4, 0)
    now = digests(tmp_path)
    assert sorted(n for n in now if n.endswith(".tar")) == [f"shard-{k:06d}.tar" for k in range(4)]
    assert all(now[n] != first[n] for n in now if n.endswith(".tar"))


def test_a_finished_set_is_regenerated_not_resumed(ingest_dir, tmp_path):
    """What `dvc repro --force degrade` and a changed distortion module do: the stage runs on a
    finished set whose plan is unchanged, and every shard is written anew."""
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    first = digests(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.tar")}
    again = run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    assert again.resumed_shards == 0 and again.shards == 6
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in tmp_path.glob("shard-*.tar"))
    assert digests(tmp_path) == first  # same code, same bytes


def test_out_dir_with_foreign_files_is_refused_not_wiped(ingest_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DegradeError, match="not shards.*notes.txt"):
        run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_inputs_name_the_fix(ingest_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"degrade.workers must be an integer in \[1, 256\], got 0"):
        DegradeConfig(workers=0)
    with pytest.raises(IngestError, match="run the ingest stage first"):
        run_degrade(CFG, tmp_path / "nowhere", tmp_path / "out", progress=False)
    with pytest.raises(DegradeError, match="no 'val' images"):
        run_degrade(replace(CFG, split="val"), ingest_dir, tmp_path / "out", progress=False)
    with pytest.raises(Exception, match="gaussian_blur"):  # the registry's did-you-mean
        run_degrade(
            replace(CFG, sample=SampleConfig(distortions=("gausian_blur",))),
            ingest_dir,
            tmp_path / "out",
            progress=False,
        )


def test_a_crop_larger_than_the_images_is_refused_before_any_shard(ingest_dir, tmp_path):
    """degrade.crop: 100000 crashed (an upscale to 10^10 pixels); any crop above an image's shorter
    side is refused from the manifest's sizes before any shard is planned or written."""
    for crop in (73, 16_384):  # the photos are 72 x 96; 16384 is the largest crop the schema allows
        cfg = replace(CFG, sample=replace(CFG.sample, crop=crop))
        with pytest.raises(
            ConfigError,
            match=rf"degrade.crop is {crop} px, larger than the shorter side of 4 of the 4 "
            r"images .* \(smallest: 72 px, .*\) — set degrade.crop to at most 72",
        ):
            run_degrade(cfg, ingest_dir, tmp_path / "out", progress=False)
        assert not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]  # its lock file only


# ---------------------------------------------------------------------------------------------
# SIGKILL midway through the CLI, then rerun: byte-identical to an uninterrupted run

KILL_CFG = {"variants": 12, "samples_per_shard": 2, "workers": 2, "crop": 64, "distortions": list(TYPES)}


@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_byte_identical(ingest_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"backend": "none"}, "degrade": KILL_CFG}))
    out = tmp_path / "shards"
    kill_midway_then_rerun(params, ingest_dir, out, lambda: [p.name for p in out.glob("*")], total=24)

    cfg = build_config(DegradeConfig, {**KILL_CFG, "workers": 1}, where="degrade")
    run_degrade(cfg, ingest_dir, tmp_path / "reference", progress=False)
    assert digests(out) == digests(tmp_path / "reference")
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# The Prefect flow: one task per shard, same bytes as run_degrade


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_prefect_flow_maps_shards_and_matches_run_degrade(ingest_dir, tmp_path, prefect_harness):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.degrade_shards import degrade_shards_flow

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"degrade": {**KILL_CFG, "variants": 3, "crop": 32}}))
    summary = degrade_shards_flow(str(params), str(ingest_dir), str(tmp_path / "flow"))
    assert summary == {"samples": 12, "shards": 6, "bytes": summary["bytes"], "resumed_shards": 0}
    run_degrade(CFG, ingest_dir, tmp_path / "pool", progress=False)
    assert digests(tmp_path / "flow") == digests(tmp_path / "pool")


@pytest.mark.slow
def test_dask_flow_on_two_worker_processes_matches_run_degrade(ingest_dir, tmp_path, prefect_harness, dask_cluster):
    from distributed import Client

    from flows.degrade_shards import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"degrade": {**KILL_CFG, "variants": 3, "crop": 32}}))
    with Client(dask_cluster) as client:
        before = client.run(lambda dask_worker: dask_worker.state.executed_count)
        summary = main(
            [
                "--params",
                str(params),
                "--ingest",
                str(ingest_dir),
                "--out",
                str(tmp_path / "dask"),
                "--dask",
                dask_cluster.scheduler_address,
            ]
        )
        ran = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert summary["shards"] == 6 and summary["resumed_shards"] == 0
    assert len(ran) == 2 and all(ran[w] > before[w] for w in ran), f"shard tasks per worker process: {ran}"
    run_degrade(CFG, ingest_dir, tmp_path / "pool", progress=False)
    assert digests(tmp_path / "dask") == digests(tmp_path / "pool")


@pytest.mark.slow
def test_dask_local_without_a_prefect_server_exits_promptly_and_quietly(ingest_dir, tmp_path):
    """`--dask local` with no PREFECT_API_URL runs on a temporary server of its own; the flow's last
    logs must reach it before it stops (issue 27: ~70 s of retries after the summary, then
    `--- Error logging to API --- All connection attempts failed`)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"degrade": {**KILL_CFG, "variants": 1, "crop": 32}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_PROFILE"))}
    env.update(CLEAN_ENV, PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "flows.degrade_shards",
        "--params",
        str(params),
        "--ingest",
        str(ingest_dir),
        "--out",
        str(tmp_path / "out"),
        "--dask",
        "local",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, summary_at = [], None
    for line in proc.stdout:  # until the process exits and closes its end
        lines.append(line)
        if line.startswith("{'samples': "):  # main's last print, after the temporary server stopped
            summary_at = time.monotonic()
    proc.wait(timeout=60)
    exit_after = time.monotonic() - summary_at if summary_at else None
    output = "".join(lines)
    assert proc.returncode == 0 and summary_at, output[-3000:]
    assert "Error logging to API" not in output and "Traceback" not in output, output[-3000:]
    assert exit_after < 15, f"exited {exit_after:.0f} s after its summary:\n{output[-3000:]}"


# ---------------------------------------------------------------------------------------------
# Shards that no longer match what was written, and two runs into one folder (issue 19)


def test_rerun_rewrites_a_damaged_shard_instead_of_indexing_it(ingest_dir, tmp_path):
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    first = digests(tmp_path)
    (tmp_path / "index.json").unlink()  # an interrupted run: only those resume (a finished set is regenerated)
    with open(tmp_path / "shard-000002.tar", "r+b") as f:  # same size, other bytes
        f.seek(1000)
        f.write(b"\x00damaged\x00")
    again = run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    assert again.resumed_shards == 5 and digests(tmp_path) == first


def test_rerun_after_a_kill_rewrites_a_damaged_shard(ingest_dir, tmp_path):
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    first = digests(tmp_path)
    (tmp_path / "index.json").unlink()  # as after a kill: shards written, no index yet
    (tmp_path / "shard-000004.tar").write_bytes((tmp_path / "shard-000001.tar").read_bytes())  # another shard's bytes
    again = run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    assert again.resumed_shards == 5 and digests(tmp_path) == first


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_fails_and_the_first_completes(ingest_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"backend": "none"}, "degrade": KILL_CFG}))
    out = tmp_path / "shards"
    first = degrade_cli(params, ingest_dir, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.tar")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGSTOP)  # the first run holds the folder, frozen mid-way
    try:
        assert first.poll() is None, "the first run ended before the second could start"
        with pytest.raises(DegradeError, match="another qualiclip degrade is writing to"):
            run_degrade(
                build_config(DegradeConfig, {**KILL_CFG, "seed": 1}, where="degrade"), ingest_dir, out, progress=False
            )
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    run_degrade(
        build_config(DegradeConfig, {**KILL_CFG, "workers": 1}, where="degrade"),
        ingest_dir,
        tmp_path / "reference",
        progress=False,
    )
    assert digests(out) == digests(tmp_path / "reference")


def test_an_interrupted_folder_from_before_shard_records_is_rewritten_not_trusted(ingest_dir, tmp_path):
    run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    first = digests(tmp_path)
    (tmp_path / "index.json").unlink()
    for record in tmp_path.glob("shard-*.tar.json"):  # as an earlier version left an interrupted run
        record.unlink()
    again = run_degrade(CFG, ingest_dir, tmp_path, progress=False)
    assert again.resumed_shards == 0 and digests(tmp_path) == first


# ---------------------------------------------------------------------------------------------
# Upper bounds (issue 26): variants whose plan cannot fit in memory are refused before the plan


def test_variants_whose_plan_cannot_fit_in_memory_are_refused_at_once(ingest_dir, tmp_path):
    from qualiclip.degrade import PLAN_BYTES_PER_SAMPLE, check_plan_fits

    cfg = replace(CFG, variants=900_000)  # within the schema's fixed bound; 4 images x 900k samples
    started = time.monotonic()
    with pytest.raises(
        DegradeError,
        match=r"degrade.variants 900000 plans 3,600,000 samples for 4 images: the plan "
        r"alone would need ~0.461 GB, more than half this machine's 0.5 GB .* at most 488281$",
    ):
        check_plan_fits(4, cfg, memory=500_000_000)
    assert time.monotonic() - started < 1
    check_plan_fits(4, replace(CFG, variants=488281), memory=500_000_000)
    assert 488281 * 4 * PLAN_BYTES_PER_SAMPLE <= 250_000_000 < 488282 * 4 * PLAN_BYTES_PER_SAMPLE
    with pytest.raises(ConfigError, match=r"degrade.variants must be an integer in \[1, 1000000\], got 1000000000000"):
        build_config(DegradeConfig, {"variants": 10**12}, where="degrade")


def test_run_degrade_checks_the_plan_against_this_machines_memory(ingest_dir, tmp_path, monkeypatch):
    import qualiclip.degrade as degrade

    monkeypatch.setattr(degrade, "_machine_memory", lambda: 3_000)  # a machine of 3 kB: 4 x 3 samples do not fit
    with pytest.raises(DegradeError, match="degrade.variants 3 plans 12 samples .* set degrade.variants to at most 2$"):
        run_degrade(CFG, ingest_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("shard-*"))


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM (issue 26): a clean stop, one line, the shards kept for the rerun


@pytest.mark.parametrize(
    ("signum", "group", "code", "name"),
    [
        (signal.SIGINT, True, 130, "Ctrl-C (SIGINT)"),  # the terminal signals the whole group, pool workers too
        (signal.SIGTERM, False, 143, "SIGTERM"),  # `kill PID`: the command alone; it stops its workers
    ],
)
def test_a_signal_stops_degrade_cleanly_and_the_rerun_finishes_the_set(ingest_dir, tmp_path, signum, group, code, name):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"backend": "none"}, "degrade": KILL_CFG}))
    out = tmp_path / "shards"
    proc = degrade_cli(params, ingest_dir, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    (os.killpg if group else os.kill)(proc.pid, signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"qualiclip degrade: stopped by {name}; the shards written so far are kept in {out}: rerun the same command "
        "to write the rest (the finished set is the same, byte for byte)"
    )
    assert not (out / "index.json").exists()
    rerun = degrade_cli(params, ingest_dir, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0 and "resumed)" in log and " 0 resumed" not in log, log
