"""Ours against the references, side by side: scoring vs pyiqa's qualiclip, distortions vs ARNIQA.

Both sides run in one process tree on one machine, one thread each (OMP/MKL/OpenBLAS/OpenCV and
torch), interleaved call by call (A B A B, the order rotated every round) so that whatever else
loads the machine hits both. Ratios are of CPU seconds per call (`time.process_time` in each
worker; medians), wall time beside them. Each side is a worker process (benchmarks/sides.py).

Scoring: RN50 with random weights, the same on every side (rounded to float16 first, which is
what pyiqa's loader does to its copy; prompt features from its random text tower; logit scale
set to pyiqa's, exp(logit_scale) / 2, so the sides must agree on the scores and the table says
by how much). Batch 1 at 512x384, 500x500, 1024x768 on real photos (CLIVE-dev, resized; decoding
not timed). Sides: ``ours`` (what `qualiclip score` runs, fp32 and bf16), ``before`` (the
scorer before the fast encoder), ``onnx`` (`qualiclip export-onnx` in onnxruntime, CPU provider,
one thread), ``pyiqa`` (pyiqa 0.1.16 ``qualiclip``, as shipped, its weights pointed at ours).
Peak RSS is each worker's VmHWM from after the model is built to the end of its calls. Then
bf16 against fp32 on CLIVE-dev photos at full size (logit scale 100): the largest score and
cosine changes, and the SRCC against MOS of both (random weights: it means little).
``--device cuda``: batch 32 at 512x384 and 1024x768, wall time after a synchronize, ONNX Runtime's
CUDA provider when it is installed.

Distortions: every type and level on 224x224 crops of Kodak photos (the same crops on both
sides). A call of ours is one level's `apply` plus a fifth of the `draw` (one draw serves a
crop's five levels; both are timed, the draw is printed too; the table's last column charges
each call of ours its whole draw instead); ARNIQA's is `distort_images`
(input clone not timed), which draws its random parts in every call. Then QualiCLIP training samples (2 crops x 5 levels;
one type, or up to 4 composed from distinct groups) with the types drawn by our sampler, the
same sequence on both sides. The weighted ratio weighs each type as our sampler draws it.

Setup (neither reference becomes a dependency; their code is only imported from these folders):

    .venv/bin/pip install --target /tmp/refsite --no-deps pyiqa==0.1.16 openai-clip==1.0.1 addict \\
        einops kornia==0.9.0 kornia_rs==0.2.0 dotmap==1.3.30
    git clone https://github.com/miccunifi/ARNIQA /tmp/arniqa   # or any snapshot with utils/
    .venv/bin/python benchmarks/bench_vs_reference.py --ref-site /tmp/refsite --arniqa-root /tmp/arniqa

About 10 minutes on 2 cores; ``--quick`` (one size, fewer rounds) about 3. ``--only scoring`` or
``--only distortions`` runs one half; ``--json FILE`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from timing import load

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
ENV = {
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PYTHONWARNINGS": "ignore",
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ref-site", type=Path, help="folder the reference packages were pip-installed into (--target)")
    p.add_argument("--arniqa-root", type=Path, help="ARNIQA work tree (has utils/utils_data.py)")
    p.add_argument("--only", choices=["scoring", "distortions"])
    p.add_argument("--quick", action="store_true", help="a smoke run: 512x384 only, fewer rounds")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="+", help="WxH (default 512x384 500x500 1024x768; cuda: 512x384 1024x768)")
    p.add_argument("--batch", type=int, help="images per call (default 1 on cpu, 32 on cuda)")
    p.add_argument("--rounds", type=int, help="timed scoring calls per side and size (default 7, quick 3)")
    p.add_argument("--sides", nargs="+", default=["ours", "ours-bf16", "onnx", "before", "pyiqa"])
    p.add_argument("--photos", type=Path, default=SHARED / "clive-dev" / "images", help="photos to score")
    p.add_argument("--crops-from", type=Path, default=SHARED / "kodak" / "images", help="photos to distort")
    p.add_argument("--calls", type=int, help="timed calls per distortion, level and side (default 12, quick 4)")
    p.add_argument("--samples", type=int, help="timed samples per kind and side (default 96, quick 24)")
    p.add_argument("--bf16-photos", type=int, help="CLIVE-dev photos for the bf16 score check (default 100, quick 16)")
    p.add_argument("--work", type=Path, help="folder for the weight files (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.sizes = args.sizes or (
        ["512x384", "1024x768"] if cuda else ["512x384"] if args.quick else ["512x384", "500x500", "1024x768"]
    )
    args.batch = args.batch or (32 if cuda else 1)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.calls = args.calls or (4 if args.quick else 12)
    args.samples = args.samples or (24 if args.quick else 96)
    args.bf16_photos = args.bf16_photos if args.bf16_photos is not None else (16 if args.quick else 100)
    return args


def available_references(args) -> dict[str, str]:
    """Which references can run; prints why a missing one is skipped."""
    missing = {}
    site = args.ref_site
    if not (site and (site / "pyiqa").is_dir() and (site / "kornia").is_dir()):
        missing["pyiqa"] = (
            f"pyiqa/kornia not found in --ref-site {site}: install them with "
            "`pip install --target DIR --no-deps pyiqa==0.1.16 openai-clip==1.0.1 addict einops "
            "kornia==0.9.0 kornia_rs==0.2.0 dotmap==1.3.30` and pass --ref-site DIR"
        )
    root = args.arniqa_root
    if not (root and (root / "utils" / "utils_data.py").is_file()):
        missing["arniqa"] = (
            f"ARNIQA not found at --arniqa-root {root}: fetch github.com/miccunifi/ARNIQA into a folder and pass it"
        )
    elif "pyiqa" in missing:
        missing["arniqa"] = "ARNIQA needs kornia from --ref-site (see the pyiqa line)"
    if args.device == "cuda" and "onnx" in args.sides:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            missing["onnx"] = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    for name, why in missing.items():
        print(f"(skipping the {name} side: {why})")
    return missing


# ---------------------------------------------------------------------------------------------
# Workers


class Worker:
    """A side in its own process; `ask` sends one command and returns its JSON reply."""

    def __init__(self, spec: dict):
        env = {**os.environ, **ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        self.name = spec["name"]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()} (its error is above)")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask(op="quit")
        self.proc.wait()
        return out


def rotations(items: list, rounds: int):
    """``items`` in a rotated order per round: no side always runs first (or right after a given one)."""
    for r in range(rounds):
        k = r % len(items)
        yield r, items[k:] + items[:k]


# ---------------------------------------------------------------------------------------------
# Scoring


def prepare_models(work: Path, want_onnx: bool) -> dict:
    """Random RN50 files for every side (built once per --work folder)."""
    files = {
        "checkpoint": work / "ours",
        "official": work / "qualiclip_random.pth",
        "backbone": work / "rn50_random_openai_keys.jit.pt",
        "onnx": work / "ours.onnx",
    }
    if not (files["checkpoint"].is_dir() and files["official"].is_file() and files["backbone"].is_file()):
        _build_random_rn50(files)
    if want_onnx and not files["onnx"].is_file():
        from qualiclip.onnx_export import export_onnx
        from qualiclip.scoring import load_scorer

        export_onnx(load_scorer(files["checkpoint"]), files["onnx"])
    return {k: str(v) for k, v in files.items()}


def _build_random_rn50(files: dict) -> None:
    import open_clip
    import torch

    from qualiclip.checkpoint import export_official, save_checkpoint
    from qualiclip.model import ModelConfig, QualiCLIP, encode_prompts

    torch.manual_seed(0)
    clip = open_clip.create_model("RN50", pretrained=None).eval()
    with torch.no_grad():  # float16-exact weights: pyiqa converts its copy to float16 and back
        for t in clip.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    scale = clip.logit_scale.exp().item() / 2  # pyiqa's qualiclip divides the CLIP scale by its temperature 2
    model = QualiCLIP(clip, encode_prompts(clip, "RN50"), ModelConfig(name="RN50", logit_scale=scale))
    save_checkpoint(model, files["checkpoint"])
    export_official(model, files["official"])
    _save_tensor_archive(clip.state_dict(), files["backbone"])


def _save_tensor_archive(state: dict, path: Path) -> None:
    """The state dict as a TorchScript archive of empty modules: pyiqa's `clip_model.load(path)`
    reads a local file only through `torch.jit.load` (as OpenAI's RN50.pt is)."""
    import torch

    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; pyiqa's loader needs it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), str(path))


def scoring_specs(args, files: dict, size: str) -> list[dict]:
    w, h = (int(v) for v in size.split("x"))
    base = {"images": str(args.photos), "size": [w, h], "batch": args.batch, "device": args.device, **files}
    specs = []
    for side in args.sides:
        spec = {**base, "name": side, "side": side.removesuffix("-bf16")}
        if side.endswith("-bf16"):
            spec["precision"] = "bf16"
        if side == "pyiqa":
            spec["site"] = str(args.ref_site)
        specs.append(spec)
    return specs


def run_scoring(args, files: dict) -> list[dict]:
    rows = []
    for size in args.sizes:
        workers = [Worker(spec) for spec in scoring_specs(args, files, size)]
        times = {w.name: {"cpu": [], "wall": []} for w in workers}
        for _, order in rotations(workers, args.rounds):
            for w in order:
                got = w.ask(op="score", n=1)
                times[w.name]["cpu"] += got["cpu"]
                times[w.name]["wall"] += got["wall"]
        for w in workers:
            rows.append(
                {
                    "size": size,
                    "side": w.name,
                    "batch": args.batch,
                    **times[w.name],
                    "scores": w.ready["scores"],
                    **w.close(),
                }
            )
        print_scoring(rows[-len(workers) :], args.device)
    return rows


def print_scoring(rows: list[dict], device: str) -> None:
    key = "wall" if device == "cuda" else "cpu"
    med = {r["side"]: statistics.median(r[key]) for r in rows}
    ours = rows[[r["side"] for r in rows].index("ours")]["scores"] if "ours" in med else None
    ref = med.get("pyiqa")
    size, batch = rows[0]["size"], rows[0]["batch"]
    print(f"\n{size}, batch {batch}, {device}: {len(rows[0][key])} interleaved calls per side")
    print(
        f"| side | {key} s/call | wall s/call | img/s ({key}) | pyiqa ÷ side | peak RSS MiB | max abs score diff vs ours |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{ref / med[r['side']]:.2f}×" if ref else "—"
        diff = max(abs(a - b) for a, b in zip(r["scores"], ours)) if ours else float("nan")
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "—"
        print(
            f"| {r['side']} | {med[r['side']]:.3f} | {statistics.median(r['wall']):.3f} | "
            f"{batch / med[r['side']]:.2f} | {ratio} | {rss} | {diff:.1e} |"
        )


def run_bf16_check(args, files: dict) -> dict:
    """Score and cosine changes of bf16 autocast, and SRCC against MOS, on CLIVE-dev at full size."""
    clive = args.photos.parent
    spec = {"name": "bf16-check", "side": "bf16-check", "clive": str(clive), "n": args.bf16_photos, **files}
    worker = Worker(spec)
    result = worker.ready
    worker.proc.wait()
    print(
        f"\nbf16 vs fp32 ({result['n']} CLIVE-dev photos at full size, random RN50, logit scale 100): "
        f"max |score change| {result['max_score_diff']:.1e} (mean {result['mean_score_diff']:.1e}), "
        f"max |cosine change| {result['max_cos_diff']:.1e}; SRCC vs MOS fp32 {result['srcc_fp32']:.4f}, "
        f"bf16 {result['srcc_bf16']:.4f} (random weights: near 0 either way); SRCC fp32 vs bf16 "
        f"{result['srcc_fp32_bf16']:.4f}"
    )
    return result


# ---------------------------------------------------------------------------------------------
# Distortions


def type_weights() -> dict[str, float]:
    """How often our sampler draws each type in a one-type sample: group uniform, then type uniform."""
    from qualiclip.distortions import GROUPS

    return {t: 1 / (len(GROUPS) * len(ts)) for ts in GROUPS.values() for t in ts}


def run_distortions(args) -> dict:
    from qualiclip.distortions import LEVELS, list_distortions

    base = {"images": str(args.crops_from), "site": str(args.ref_site), "arniqa_root": str(args.arniqa_root)}
    sides = [
        Worker({**base, "name": "ours", "side": "ours-dist"}),
        Worker({**base, "name": "arniqa", "side": "arniqa"}),
    ]
    n_crops = sides[0].ready["crops"]
    calls: dict = {}
    per_round = max(1, args.calls // 4)
    for name in list_distortions():
        for level in LEVELS:
            got = {w.name: {"draw": [], "apply": []} for w in sides}
            for r, order in rotations(sides, max(1, args.calls // per_round)):
                for w in order:
                    reply = w.ask(op="call", type=name, level=level, n=per_round, first=(r * per_round) % n_crops)
                    got[w.name]["draw"] += reply["draw"]
                    got[w.name]["apply"] += reply["apply"]
            calls[(name, level)] = got
    samples = {kind: time_samples(sides, sample_specs(kind, args.samples, n_crops)) for kind in (1, 4)}
    for w in sides:
        w.close()
    return summarise_distortions(calls, samples)


def sample_specs(max_types: int, n: int, n_crops: int) -> list[tuple[list[str], list[int]]]:
    """(types, two crop indices) per sample. One type: every type equally often (weighted by our
    mix afterwards, so the rare expensive types do not make the figure a lottery); composed:
    compositions as our sampler draws them (the same list on both sides)."""
    import numpy as np

    from qualiclip.distortions import list_distortions
    from qualiclip.sampling import SampleConfig, draw_composition

    rng = np.random.default_rng(max_types)
    if max_types == 1:
        names = [[t] for t in list_distortions() for _ in range(max(1, n // 24))]
        names = [names[i] for i in rng.permutation(len(names))]
    else:
        cfg = SampleConfig(max_distortions=max_types)
        names = [[d.name for d in draw_composition(cfg, rng)] for _ in range(n)]
    return [(t, [int(c) for c in rng.integers(0, n_crops, 2)]) for t in names]


def time_samples(sides: list[Worker], specs: list, chunk: int = 8) -> dict:
    """CPU s per sample and side, in ``specs`` order, interleaved ``chunk`` samples at a time."""
    out = {w.name: [] for w in sides}
    for r, order in rotations(sides, (len(specs) + chunk - 1) // chunk):
        for w in order:
            out[w.name] += w.ask(op="sample", samples=specs[r * chunk : (r + 1) * chunk])["cpu"]
    return {"specs": specs, **out}


def summarise_distortions(calls: dict, samples: dict) -> dict:
    from qualiclip.distortions import LEVELS

    weights = type_weights()
    med = {}
    for (name, level), got in calls.items():
        o, a = got["ours"], got["arniqa"]
        med[(name, level)] = {
            "ours_apply": statistics.median(o["apply"]),
            "ours_draw": statistics.median(o["draw"]),
            "ours_call": statistics.median([a + d / len(LEVELS) for d, a in zip(o["draw"], o["apply"])]),
            "ours_full_draw": statistics.median([a + d for d, a in zip(o["draw"], o["apply"])]),
            "arniqa": statistics.median(a["apply"]),
        }
    cost = {}
    for name in weights:  # one crop at 5 levels: ours draws once; ARNIQA draws in every call
        rows = [med[(name, level)] for level in LEVELS]
        cost[name] = {
            "ours": rows[0]["ours_draw"] + sum(r["ours_apply"] for r in rows),
            "arniqa": sum(r["arniqa"] for r in rows),
        }
    weighted = sum(w * cost[t]["arniqa"] for t, w in weights.items()) / sum(
        w * cost[t]["ours"] for t, w in weights.items()
    )
    uniform = sum(c["arniqa"] for c in cost.values()) / sum(c["ours"] for c in cost.values())
    sample_rows = {1: {}, 4: {}}
    for side in ("ours", "arniqa"):
        one = samples[1]
        by_type = {
            t: statistics.mean(c for (names, _), c in zip(one["specs"], one[side]) if names == [t]) for t in weights
        }
        sample_rows[1][side] = sum(weights[t] * by_type[t] for t in weights)  # s/sample at our type mix
        sample_rows[4][side] = statistics.mean(samples[4][side])
    return {
        "per_call": {f"{n}:{level}": v for (n, level), v in med.items()},
        "per_type_crop_s": cost,
        "ratio_weighted_by_our_mix": weighted,
        "ratio_uniform": uniform,
        "samples_cpu_s": sample_rows,
    }


def print_distortions(result: dict) -> None:
    from qualiclip.distortions import LEVELS, list_distortions

    per_call = result["per_call"]
    print(
        "\nDistortions, 224x224, CPU ms per call (ours: apply + 1/5 of the draw, which serves a crop's 5 levels; "
        "ARNIQA: distort_images, which draws in every call)"
    )
    print("| type | ARNIQA L1–L5 | ours L1–L5 | ARNIQA ÷ ours L1–L5 | min | min, a full draw per call |")
    print("|---|---|---|---|---|---|")
    for name in list_distortions():
        rows = [per_call[f"{name}:{level}"] for level in LEVELS]
        ratios = [r["arniqa"] / r["ours_call"] for r in rows]
        full = min(r["arniqa"] / r["ours_full_draw"] for r in rows)  # ours charged its whole draw, as ARNIQA is
        fmt = lambda xs: " ".join(f"{1e3 * x:.2f}" for x in xs)  # noqa: E731
        print(
            f"| {name} | {fmt(r['arniqa'] for r in rows)} | {fmt(r['ours_call'] for r in rows)} | "
            f"{' '.join(f'{x:.1f}' for x in ratios)} | {min(ratios):.2f}× | {full:.2f}× |"
        )
    print(
        f"\nOne crop at 5 levels, ARNIQA ÷ ours: {result['ratio_weighted_by_our_mix']:.2f}× weighted by our "
        f"sampler's type mix, {result['ratio_uniform']:.2f}× with every type equally often"
    )
    print("| sample (2 crops × 5 levels) | ours samples/CPU-s | ARNIQA samples/CPU-s | ratio |")
    print("|---|---|---|---|")
    for kind, label in ((1, "one type, our mix"), (4, "composed, up to 4 types")):
        s = result["samples_cpu_s"][kind]
        print(f"| {label} | {1 / s['ours']:.1f} | {1 / s['arniqa']:.1f} | {s['arniqa'] / s['ours']:.2f}× |")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse()
    if args.worker:
        import sides

        return sides.main(json.loads(args.worker))
    missing = available_references(args)
    print(f"at start: {load()}")
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.only in (None, "scoring"):
        args.sides = [s for s in args.sides if s not in missing]
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            files = prepare_models(work, "onnx" in args.sides)
            out["scoring"] = run_scoring(args, files)
            if args.device == "cpu" and args.bf16_photos and (args.photos.parent / "labels.csv").is_file():
                out["bf16"] = run_bf16_check(args, files)
    if args.only in (None, "distortions") and "arniqa" not in missing:
        out["distortions"] = run_distortions(args)
        print_distortions(out["distortions"])
    print(f"at end: {load()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
