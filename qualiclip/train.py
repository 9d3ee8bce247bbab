"""The ``train`` stage: fine-tune the image encoder on shards so prompt similarities rank quality.

One process, or one per GPU under ``torchrun`` (DistributedDataParallel over the image encoder;
shards are split by node and by worker in the loader; only rank 0 writes files). Every
``checkpoint_every`` steps the train state is written atomically to ``out_dir/train_state.pt``;
a later run with the same params resumes from it and ends with the same weights as a run that
was never interrupted (the batch stream is re-derived: same seed, consumed batches skipped).
Before any step the shard sizes are checked against their index (the loader checks each
shard's sha256 when it first reads it), and the train state records the index digest it was
trained on: a state is never resumed on other shards.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from .checkpoint import TRAIN_STATE, load_train_state, save_checkpoint, save_train_state
from .device import resolve_device
from .errors import QualiclipError
from .identity import index_digest, replica_digest, resume_key, resume_params
from .loader import LoaderStats, iterate_batches
from .losses import qualiclip_loss
from .model import QualiCLIP, create_model
from .schema import ModelConfig, TrainConfig
from .shards import shard_paths
from .tracking import Tracker

if TYPE_CHECKING:  # imported by the caller only for train.source: on_the_fly (the degrade code)
    from .onthefly import SamplePlan

log = logging.getLogger(__name__)
LOSS_KEYS = ("loss", "loss_cons", "loss_pos", "loss_neg")


class TrainError(QualiclipError, RuntimeError):
    """The train stage cannot run or resume; the message names the fix."""


PROGRESS_ENV = "QUALICLIP_PROGRESS_SECONDS"  # overrides PROGRESS_SECONDS (tests set it low)
PROGRESS_SECONDS = 20.0  # off a terminal, a progress line at least this often (a step permitting)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    steps: int
    seconds: float
    final: dict[str, float]
    corrupt_samples: int


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Trainer:
    """Everything one optimisation step touches."""

    model: QualiCLIP
    encoder: nn.Module  # model.visual, wrapped by DDP and/or torch.compile
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    dist: DistInfo
    ema: AveragedModel | None = None  # moving average of model.visual (weights and BatchNorm statistics)


# ---------------------------------------------------------------------------------------------
# Setup


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


def process_device(cfg: TrainConfig, dist_info: DistInfo) -> torch.device:
    """The device of this process: under torchrun each rank takes the GPU of its local rank."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist_info.world_size > 1:
        return torch.device("cuda", dist_info.local_rank)
    return device


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32.

    CUDA: ``auto`` is bf16 (fp16 with a GradScaler where bf16 is unsupported). CPU: fp32 unless
    ``bf16`` is asked for explicitly (1.6x faster steps on a CPU with AMX-BF16, docs/training.md);
    fp16 autocast on CPU is not offered.
    """
    if cfg.precision == "fp32":
        return None
    if device.type != "cuda":
        if device.type == "cpu" and cfg.precision == "bf16":
            return torch.bfloat16
        if cfg.precision != "auto":
            log.warning("train.precision=%s is not available on %s; training in fp32", cfg.precision, device)
        return None
    if cfg.precision == "fp16" or (cfg.precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def bn_frozen(cfg: TrainConfig, model_cfg: ModelConfig) -> bool:
    """BatchNorm statistics frozen? ``auto``: yes for pretrained weights, no from scratch.

    A training batch is a few images, each as 10 strongly correlated crops whose quality the
    loss pulls apart; batch statistics of such batches are a poor estimate of the pretrained
    running statistics (computed on large natural-image batches) and would drift. A randomly
    initialised network has no statistics worth keeping, so it must learn them.
    """
    return cfg.bn_mode == "frozen" or (cfg.bn_mode == "auto" and model_cfg.pretrained is not None)


def build_trainer(cfg: TrainConfig, model_cfg: ModelConfig, dist_info: DistInfo) -> Trainer:
    """Model on its device, wrapped encoder, optimizer over the image encoder only, schedule, scaler."""
    device = process_device(cfg, dist_info)
    model = create_model(model_cfg).to(device)
    use_cl = cfg.channels_last and device.type in ("cuda", "cpu")
    if use_cl:
        model.visual.to(memory_format=torch.channels_last)
    encoder: nn.Module = model.visual
    if dist_info.world_size > 1:
        encoder = DDP(encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        encoder = torch.compile(encoder)  # type: ignore[assignment]  # a compiled module is called as one
    model.visual_train_mode(bn_frozen(cfg, model_cfg))
    params = [p for p in model.visual.parameters() if p.requires_grad]  # text tower: frozen, no optimizer state
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = AveragedModel(model.visual, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    return Trainer(model, encoder, params, opt, sched, scaler, device, dtype, use_cl, dist_info, ema)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# One step


def to_model_input(batch: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 2, L, H, W, 3) -> float (B·2·L, 3, H, W) in [0,1]."""
    x = batch.to(device, non_blocking=True).permute(0, 1, 2, 5, 3, 4)
    x = x.reshape(-1, *x.shape[3:]).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def step_losses(t: Trainer, batch: torch.Tensor, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Forward pass and loss terms (float32) for a uint8 batch (B, 2, L, H, W, 3)."""
    b, c, levels = batch.shape[:3]
    autocast = torch.autocast(t.device.type, dtype=t.amp_dtype) if t.amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        sims = t.model.similarities(to_model_input(batch, t.device, t.channels_last), t.encoder)  # (B·2·L, K, 2)
    return qualiclip_loss(sims.float().view(b, c, levels, *sims.shape[1:]), cfg.loss)


def optimize(t: Trainer, batch: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """One optimisation step; returns the loss terms (averaged over processes) and the lr used."""
    losses = step_losses(t, batch, cfg)
    t.opt.zero_grad(set_to_none=True)
    t.scaler.scale(losses["loss"]).backward()  # DDP all-reduces gradients here
    if cfg.grad_clip > 0:
        t.scaler.unscale_(t.opt)
        torch.nn.utils.clip_grad_norm_(t.params, cfg.grad_clip)
    lr = t.sched.get_last_lr()[0]
    t.scaler.step(t.opt)
    t.scaler.update()
    t.sched.step()
    if t.ema is not None:  # replicas hold equal weights after the step, so their averages agree too
        t.ema.update_parameters(t.model.visual)
    terms = torch.stack([losses[k].detach() for k in LOSS_KEYS])
    if t.dist.world_size > 1:
        torch.distributed.all_reduce(terms)
        terms /= t.dist.world_size
    return {**dict(zip(LOSS_KEYS, terms.tolist())), "lr": lr}


# ---------------------------------------------------------------------------------------------
# Train state (resume)


def rng_state() -> dict:
    """torch (CPU, CUDA), numpy and Python RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()  # the legacy tuple form (legacy=True, the default)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),  # type: ignore[index]
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def train_state(
    t: Trainer, step: int, key: str, rows: list[dict], shards: str | None = None, params: dict | None = None
) -> dict:
    """What a resumed run needs: encoder weights and buffers, optimizer, schedule, RNG, log, step,
    ``shards``, the digest of the shard index trained on (`identity.index_digest`), and ``params``,
    the `resume_params` of ``key`` as strings (so a refusal can name what changed)."""
    return {
        "format": 1,
        "key": key,
        "step": step,
        "world_size": t.dist.world_size,
        "shards": shards,
        "params": {k: repr(v) for k, v in (params or {}).items()},
        "visual": cpu_tensors(t.model.visual.state_dict()),
        "optimizer": t.opt.state_dict(),
        "scheduler": t.sched.state_dict(),
        "scaler": t.scaler.state_dict(),
        "rng": rng_state(),
        "log": rows,
        "ema": cpu_tensors(t.ema.state_dict()) if t.ema is not None else None,
    }


def check_train_state(state: dict, key: str, path: Path, shards: str | None = None, params: dict | None = None) -> None:
    """Refuse ``state`` when its params key differs from ``key`` (naming the params that changed,
    from ``params``, this run's `resume_params`), or when it was trained on shards other than
    those of the digest ``shards``. Called before the model is built, so a refusal costs no build.
    A state written before states recorded their shards is resumed with a warning (it cannot tell).
    """
    if state.get("key") != key:
        raise TrainError(
            f"train state {path} (step {state.get('step')}) was written with other params (or another number of "
            f"processes) than this run{changed_params(state.get('params'), params)}. Fix, either: restore those "
            f"params to resume from step {state.get('step')}; or delete {path} (or set train.resume: false) "
            "to train from step 0 with the new ones."
        )
    if state.get("shards") is None:
        log.warning(
            "train state %s does not record its shards (written by an earlier version); resuming on "
            "the current shards — delete it if they changed since",
            path,
        )
    elif shards is not None and state["shards"] != shards:
        raise TrainError(
            f"train state {path} was trained on other shards (index digest {state['shards'][:12]}, now "
            f"{shards[:12]}): resuming would mix two data sets. Fix: delete {path} to train from step 0 on the "
            "new shards, or set train.resume: false."
        )


def changed_params(recorded: dict | None, now: dict | None) -> str:
    """`` (train.lr: 0.001 then, 0.002 now; ...)``, or "" when the state records no params."""
    if not recorded or not now:
        return ""
    now = {k: repr(v) for k, v in now.items()}
    diff = [
        f"{k}: {recorded.get(k, 'unset')} then, {now.get(k, 'unset')} now"
        for k in sorted(recorded.keys() | now.keys())
        if recorded.get(k) != now.get(k)
    ]
    return f" ({'; '.join(diff)})" if diff else ""


def restore_train_state(t: Trainer, state: dict) -> tuple[int, list[dict]]:
    """Load ``state`` (accepted by `check_train_state`) into ``t``; returns (step reached, log rows so far)."""
    t.model.visual.load_state_dict(state["visual"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
    return int(state["step"]), list(state["log"])


# ---------------------------------------------------------------------------------------------
# The stage


def shard_batches(
    cfg: TrainConfig,
    shard_dir: str | os.PathLike | SamplePlan,
    dist_info: DistInfo,
    stats: LoaderStats,
    skip: int,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """This process's batch stream, with the first ``skip`` batches (consumed before a resume) dropped.

    ``shard_dir``: a shard folder or bucket prefix, or the degrade plan whose samples the loader
    renders itself (`onthefly.SamplePlan`): its planned shards are split as shard files are.
    """
    plan = None if isinstance(shard_dir, (str, os.PathLike)) else shard_dir
    n_shards = len(plan.jobs) if plan is not None else len(shard_paths(shard_dir))  # type: ignore[arg-type]
    if n_shards < dist_info.world_size:
        raise TrainError(
            f"{n_shards} shards in {_where(shard_dir)} for {dist_info.world_size} processes: every process needs "
            "one. Fix: write more, smaller shards (lower degrade.samples_per_shard) or use fewer processes."
        )
    # A loader worker without a shard would never yield; the loader only knows the total count.
    workers = min(cfg.num_workers, n_shards // dist_info.world_size)
    options = dict(
        shuffle_buffer=cfg.shuffle_buffer, num_workers=workers, seed=cfg.seed, stats=stats, pin_memory=pin_memory
    )
    if plan is not None:
        batches = plan.batches(cfg.batch_size, **options)  # type: ignore[arg-type]
    else:
        batches = iterate_batches(shard_dir, cfg.batch_size, **options)  # type: ignore[arg-type]
    for _ in range(skip):
        next(batches)
    return batches


def _where(data: str | os.PathLike | SamplePlan) -> str:
    return str(data) if isinstance(data, (str, os.PathLike)) else data.where


def gather_digests(t: Trainer) -> list[str]:
    """The digest of every replica, rank order (one entry in a single process).

    DDP broadcasts rank 0's buffers (BatchNorm running statistics) at the start of each forward,
    so after the last step each rank still holds its own; rank 0's are broadcast first.
    """
    if t.dist.world_size == 1:
        return [replica_digest(t.model.visual.state_dict())]
    for buf in t.model.visual.buffers():
        torch.distributed.broadcast(buf, src=0)
    digest = replica_digest(t.model.visual.state_dict())
    out: list = [None] * t.dist.world_size
    torch.distributed.all_gather_object(out, digest)
    return out


def log_step(tracker: Tracker, row: dict, crops: int, seconds: float) -> None:
    metrics = {f"train/{k}": v for k, v in row.items() if k != "step"}
    metrics["train/crops_per_s"] = crops / max(seconds, 1e-9)
    tracker.log_metrics(metrics, step=row["step"])


def run_train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    shard_dir: str | os.PathLike | SamplePlan,
    out_dir: Path,
    *,
    tracker: Tracker | None = None,
    progress: bool = True,
    metadata: dict | None = None,
) -> TrainResult:
    """Train to ``cfg.steps`` (resuming from ``out_dir/train_state.pt`` if allowed) and write
    ``out_dir/checkpoint/`` and ``out_dir/train_log.csv`` (rank 0 only under torchrun). ``shard_dir``
    is a folder or a bucket prefix (``s3://bucket/shards``), streamed by the loader, or for
    ``train.source: on_the_fly`` the degrade plan (`onthefly.plan_samples`) whose samples the
    loader workers render: the same batches, so the same losses and weights.

    ``progress``: a progress bar on stderr when it is a terminal (none in logs and pipes)."""
    tracker = tracker or Tracker()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist_info = init_distributed(cfg)
    shards = check_data(shard_dir, cfg.batch_size)
    state_path = Path(out_dir) / TRAIN_STATE
    params = resume_params(cfg, model_cfg, dist_info.world_size)
    key = resume_key(cfg, model_cfg, dist_info.world_size)
    state = load_train_state(state_path) if cfg.resume else None
    if state is not None:  # a state this run cannot resume is refused now, not after seconds of model build
        check_train_state(state, key, state_path, shards, params)
    t = build_trainer(cfg, model_cfg, dist_info)
    torch.manual_seed(cfg.seed)
    start, rows = 0, list[dict]()
    if state is not None:
        start, rows = restore_train_state(t, state)
        log.info("resuming from step %d (%s)", start, state_path)
    stats = LoaderStats()
    batches = shard_batches(cfg, shard_dir, dist_info, stats, skip=start, pin_memory=t.device.type == "cuda")
    saved = functools.partial(train_state, key=key, shards=shards, params=params)
    seconds = train_loop(
        t,
        cfg,
        batches,
        range(start, cfg.steps),
        rows,
        tracker,
        state_path,
        saved,
        progress_lines(progress and dist_info.main),
    )
    return finish(t, cfg, Path(out_dir), rows, seconds, stats, metadata, state_path)


def check_data(data: str | os.PathLike | SamplePlan, batch_size: int | None = None) -> str:
    """`check_shards` for a shard folder; for a degrade plan (on the fly), the batch size check
    alone, and its digest (`identity.plan_digest`) as the data digest a train state records."""
    if isinstance(data, (str, os.PathLike)):
        return check_shards(data, batch_size)
    if batch_size is not None and batch_size > data.total_samples:
        raise TrainError(
            f"train.batch_size {batch_size} is larger than the {data.total_samples} samples of {data.where} — "
            f"set train.batch_size to at most {data.total_samples}, or degrade more images or variants"
        )
    return data.digest


def check_shards(shard_dir: str | os.PathLike, batch_size: int | None = None) -> str:
    """Refuse shards whose size differs from the index, and a ``batch_size`` larger than the whole
    set (its upper bound: such a batch repeats samples and can outgrow memory); returns the index
    digest (`identity.index_digest`).

    Sizes cost one listing of the folder or bucket prefix; each shard's sha256 is checked by the loader when it
    first reads it, before any of its samples is used (`loader.expand_shards`), so the check
    costs no extra pass over the data.
    """
    from .shards import ShardError, read_index, verify_shards

    index = read_index(shard_dir)
    if batch_size is not None and batch_size > index["total_samples"]:
        raise TrainError(
            f"train.batch_size {batch_size} is larger than the {index['total_samples']} samples in "
            f"{shard_dir} — set train.batch_size to at most {index['total_samples']}, or degrade more "
            "images or variants"
        )
    bad = verify_shards(shard_dir, names=[])
    if bad:
        raise ShardError(
            f"{len(bad)} shard(s) in {shard_dir} differ from the index (e.g. {bad[0]}: replaced, damaged "
            "or from another run) — rerun the degrade stage (`dvc repro degrade`) to rewrite them"
        )
    return index_digest(index)


def train_loop(
    t: Trainer,
    cfg: TrainConfig,
    batches,
    steps: range,
    rows: list[dict],
    tracker: Tracker,
    state_path: Path,
    saved: Callable[..., dict],
    lines: ProgressLines | None,
) -> float:
    """Run ``steps``, appending a log row per step; returns the seconds spent. ``saved(t, step,
    rows=...)`` is the train state written every ``checkpoint_every`` steps; ``lines``, when given,
    prints a progress line now and then (a bar is shown instead on a terminal)."""
    crops_per_step = cfg.batch_size * t.dist.world_size
    start = window = time.perf_counter()
    window_steps = 0
    for step in tqdm(steps, desc="train", unit="step", disable=None if lines is not None else True):
        batch = next(batches)
        row = {"step": step + 1, **optimize(t, batch, cfg)}
        rows.append(row)
        window_steps += 1
        if t.dist.main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            now = time.perf_counter()
            crops = window_steps * crops_per_step * batch.shape[1] * batch.shape[2]
            log_step(tracker, row, crops, now - window)
            window, window_steps = now, 0
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if t.dist.main:  # replicas are identical; rank 0 speaks for all
                save_train_state(saved(t, step + 1, rows=rows), state_path)
        if lines is not None:
            lines.step(row, steps)
    return time.perf_counter() - start


def progress_lines(show: bool) -> ProgressLines | None:
    """Progress for this process: None when ``show`` is off (no bar, no lines); lines only off a
    terminal (the bar, on stderr, shows itself on one)."""
    if not show:
        return None
    every = float(os.environ.get(PROGRESS_ENV) or PROGRESS_SECONDS)
    return ProgressLines(every, enabled=not sys.stderr.isatty())


class ProgressLines:
    """A line on stdout, at most every ``every`` seconds, for a log that a bar cannot draw in::

        train: step 120/2000 (6%), loss 0.4123, 1.85 steps/s, ETA 16m56s

    Printed (flushed at once) rather than logged, so that it shows under ``dvc repro > log``
    without ``--verbose`` and reaches a Prefect task's log at INFO.
    """

    def __init__(self, every: float, enabled: bool = True):
        self.every, self.enabled = every, enabled
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def step(self, row: dict, steps: range) -> None:
        self.done += 1
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every or row["step"] == steps.stop:
            return  # the stage's own summary line follows the last step
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (steps.stop - row["step"]) / rate
        print(
            f"train: step {row['step']}/{steps.stop} ({100 * row['step'] // steps.stop}%), loss {row['loss']:.4f}, "
            f"{rate:.2f} steps/s, ETA {duration(eta)}",
            flush=True,
        )


def duration(seconds: float) -> str:
    """``42s``, ``16m56s``, ``2h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def finish(
    t: Trainer,
    cfg: TrainConfig,
    out_dir: Path,
    rows: list[dict],
    seconds: float,
    stats: LoaderStats,
    metadata: dict | None,
    state_path: Path,
) -> TrainResult:
    """Write the checkpoint folder and the log (rank 0), drop the train state, leave the process group."""
    digests = gather_digests(t)
    if t.ema is not None:  # the average is the model: evaluated, scored and exported
        t.model.visual.load_state_dict(t.ema.module.state_dict())
    final = {k: v for k, v in rows[-1].items() if k.startswith("loss")} if rows else {}
    ckpt = out_dir / "checkpoint"
    if t.dist.main:
        meta = {
            "steps": cfg.steps,
            "seconds": round(seconds, 2),
            "final": final,
            "corrupt_samples": stats.corrupt,
            "world_size": t.dist.world_size,
            "replica_digests": digests,
            "ema": cfg.ema,
            **(metadata or {}),
        }
        save_checkpoint(t.model.cpu(), ckpt, meta)
        write_log(out_dir / "train_log.csv", rows)
        state_path.unlink(missing_ok=True)  # the run is complete: the checkpoint supersedes it
    if t.dist.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(ckpt, cfg.steps, seconds, final, stats.corrupt)


def write_log(path: Path, rows: list[dict]) -> None:
    """Per-step losses and learning rate, a CSV that DVC plots as loss curves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["step", "loss", "loss_cons", "loss_pos", "loss_neg", "lr"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: (round(r[k], 6) if isinstance(r[k], float) else r[k]) for k in keys} for r in rows)
