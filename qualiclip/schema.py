"""The params file's schema: the config of each library stage, its defaults and allowed values.

Every stage checks the whole params file before any work (`qualiclip.pipeline.params`), so every
stage process loads these declarations, and only these: no torch, no open_clip, no distortion
code. That keeps each DVC stage's code dependencies what its work loads (dvc.yaml; a test checks
them): editing a distortion reruns degrade, train and evaluate but not ingest, yet ingest still
refuses a misspelt ``train:`` key before it reads a photo. Editing a declaration here (a default,
a range, a distortion's name) reruns every stage, since each one checks the file against it.

The stage modules re-export their configs (``qualiclip.train.TrainConfig`` is this module's); a
config that embeds another (``TrainConfig.loss: LossWeights``, ``DegradeConfig.sample:
SampleConfig``) reads its keys flat from the same section (`qualiclip.config.build_config`).
`IngestConfig` stays in `qualiclip.ingest`, which every stage loads anyway.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval, MinLen, Predicate, doc

from .config import Seed, check_fields, lookalike_note
from .errors import QualiclipError

TINY_MODEL = "qualiclip-tiny-rn"  # the project's from-scratch test and demo backbone (model_configs/)

# Fixed upper bounds of the counts (docs/params.md lists every range). Each is far above any real
# run and far below what breaks a machine; where the data or the machine sets a tighter bound, the
# stage checks it before any work: degrade.variants (the plan must fit in memory), train.batch_size
# (at most the training set), the crops (at most an image's shorter side).
MAX_SIDE = 16384  # crop sides, pixels
MAX_VARIANTS = 1_000_000  # samples per pristine image
MAX_SHARD_SAMPLES = 10_000  # samples per shard (a shard is rendered in memory: ~1.5 MB per sample at crop 224)
MAX_WORKERS = 256  # processes or loader workers
MAX_THREADS = 1024  # torch CPU threads
MAX_STEPS = 10**9  # optimisation steps (and step counts: warmup, logging, checkpoints)
MAX_BATCH = 65_536  # samples or images per batch
MAX_SHUFFLE = 10_000  # samples in the shuffle buffer (held in memory)
MAX_WEIGHT = 1000  # loss weights
MAX_EPOCHS = 100_000  # QualiCLIP+ epochs over a labelled set (the paper: 50)
MAX_CACHED_CROPS = 1000  # QualiCLIP+ cached crops per training image (features: a few KB each)

# The 24 distortion types in the registry's table order (distortions/registry.py holds their groups,
# levels and code, and checks at import that its names are these).
DISTORTION_NAMES: tuple[str, ...] = (
    "gaussian_blur",
    "lens_blur",
    "motion_blur",
    "color_diffusion",
    "color_shift",
    "color_saturation1",
    "color_saturation2",
    "jpeg2000",
    "jpeg",
    "white_noise",
    "white_noise_cc",
    "impulse_noise",
    "multiplicative_noise",
    "brighten",
    "darken",
    "mean_shift",
    "jitter",
    "non_eccentricity_patch",
    "pixelate",
    "quantization",
    "color_block",
    "high_sharpen",
    "linear_contrast_change",
    "non_linear_contrast_change",
)


class UnknownDistortionError(QualiclipError, KeyError, ValueError):
    """A distortion or group name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def unknown_name(kind: str, name: object, choices: list[str]) -> UnknownDistortionError:
    """The error for an unknown ``kind`` (distortion, distortion group), with the closest choice."""
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = (
        f"{lookalike_note(name, close[0])} — did you mean '{close[0]}'?" if close else f"; known: {', '.join(choices)}"
    )
    return UnknownDistortionError(f"unknown {kind} {name!r}{hint}")


def check_distortion_name(name: object) -> bool:
    """True for a registered distortion type; `UnknownDistortionError` with the close match otherwise."""
    if name not in DISTORTION_NAMES:
        raise unknown_name("distortion", name, list(DISTORTION_NAMES))
    return True


# A config field naming a distortion: an unknown name fails with the close match when the config is built
DistortionName = Annotated[str, Predicate(check_distortion_name)]

_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def is_device_name(name: object) -> bool:
    """Whether ``name`` is a device params.yaml may name: auto, cpu, cuda, cuda:N or mps."""
    return isinstance(name, str) and _DEVICE_NAME.fullmatch(name) is not None


# A config field naming a device, checked when the config is built (a typo fails before any work)
DeviceName = Annotated[str, Predicate(is_device_name), doc("auto, cpu, cuda, cuda:N or mps")]


@dataclass(frozen=True)
class ModelConfig:
    """Which backbone to build and how to score with it (``model:`` in params.yaml).

    ``pretrained``: ``None`` (random init, seeded), an open_clip tag such as ``openai``
    (the paper: ``name: RN50, pretrained: openai``), or a local ``.pt``/``.pth``/``.safetensors``
    file holding an open_clip state dict or an official QualiCLIP checkpoint.
    """

    name: Annotated[str, MinLen(1)] = TINY_MODEL
    pretrained: str | None = None
    pos_embedding: Literal["drop", "interpolate"] = "drop"
    logit_scale: Annotated[float, Interval(gt=0, le=1000)] = 100.0  # CLIP caps its own at 100
    seed: Seed = 0

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass(frozen=True)
class SampleConfig:
    """How one training sample is drawn; every field lives in params.yaml ``degrade:``."""

    crop: Annotated[int, Interval(ge=1, le=MAX_SIDE)] = (
        224  # at most the shorter side of every image (checked by degrade)
    )
    min_overlap: Annotated[float, Interval(ge=0, le=1)] = 0.5
    max_distortions: Annotated[int, Interval(ge=1, le=len(DISTORTION_NAMES))] = 1  # more than the groups: all groups
    include_pristine: bool = False
    distortions: tuple[DistortionName, ...] = ()  # empty: every registered type

    def __post_init__(self) -> None:
        check_fields(self, "degrade")

    @property
    def max_shift(self) -> int:
        """Largest per-axis offset of the second crop, ``crop·(1 − min_overlap)``."""
        return int(self.crop * (1.0 - self.min_overlap))


@dataclass(frozen=True)
class DegradeConfig:
    """The ``degrade`` section of params.yaml (see docs/shards.md); how one sample is drawn sits
    in it, flat (crop, min_overlap, max_distortions, include_pristine, distortions)."""

    seed: Seed = 0
    variants: Annotated[int, Interval(ge=1, le=MAX_VARIANTS)] = (
        24  # samples per pristine image; the plan must fit in memory (checked by degrade)
    )
    samples_per_shard: Annotated[int, Interval(ge=1, le=MAX_SHARD_SAMPLES)] = 32  # a shard is rendered in memory
    workers: Annotated[int, Interval(ge=1, le=MAX_WORKERS)] = 2  # processes; the output bytes do not depend on it
    encoding: Literal["png", "webp", "npy"] = "webp"  # shards.ENCODINGS (a test keeps them equal)
    split: Literal["train", "val"] = "train"  # which ingest split to degrade
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        check_fields(self, "degrade")


@dataclass(frozen=True)
class LossWeights:
    """The loss margins and weights (params.yaml ``train:``, flat)."""

    margin_rank: Annotated[float, Interval(ge=0, le=2)] = (
        0.05  # cosines differ by at most 2: a wider margin is never met
    )
    margin_cons: Annotated[float, Interval(ge=0, le=2)] = 0.0
    lambda_cons: Annotated[float, Interval(ge=0, le=MAX_WEIGHT)] = 1.0
    lambda_pos: Annotated[float, Interval(ge=0, le=MAX_WEIGHT)] = 1.0
    lambda_neg: Annotated[float, Interval(ge=0, le=MAX_WEIGHT)] = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "train")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section of params.yaml (the loss margins and weights sit in it, flat)."""

    seed: Seed = 0
    steps: Annotated[int, Interval(ge=1, le=MAX_STEPS)] = 300
    batch_size: Annotated[int, Interval(ge=1, le=MAX_BATCH)] = (
        4  # samples per step and process (each 2 crops × 5 levels); at most the training set (checked by train)
    )
    lr: Annotated[float, Interval(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Interval(ge=0, le=10)] = 0.0
    warmup_steps: Annotated[int, Interval(ge=0, le=MAX_STEPS)] = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: Annotated[float, Interval(ge=0, le=1e6)] = 1.0  # max gradient norm; 0 disables
    loss: LossWeights = field(default_factory=LossWeights)  # margin_rank, margin_cons, lambda_cons/pos/neg
    bn_mode: Literal["auto", "train", "frozen"] = "auto"  # auto: frozen for pretrained weights
    shuffle_buffer: Annotated[int, Interval(ge=0, le=MAX_SHUFFLE)] = (
        64  # samples held in memory (~1.5 MB each at crop 224); 0: no shuffling
    )
    num_workers: Annotated[int, Interval(ge=0, le=MAX_WORKERS)] = 1  # 0: load in the training process
    # shards: read degrade's output; on_the_fly: the loader workers render the same samples from the
    # ingest output and the degrade section (qualiclip.onthefly; docs/training.md, "Samples on the fly")
    source: Literal["shards", "on_the_fly"] = "shards"
    device: DeviceName = "auto"
    threads: Annotated[int, Interval(ge=0, le=MAX_THREADS)] = 0  # torch CPU threads; 0 keeps torch's default
    log_every: Annotated[int, Interval(ge=1, le=MAX_STEPS)] = 10
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast; auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True  # NHWC convolutions (tensor cores on CUDA; on CPU measured neutral)
    compile: bool = False  # torch.compile the image encoder
    checkpoint_every: Annotated[int, Interval(ge=0, le=MAX_STEPS)] = 50  # steps between resumable train states; 0: none
    resume: bool = True  # continue from out_dir/train_state.pt when one exists
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # under torchrun; auto: nccl on CUDA
    # decay of an exponential moving average of the encoder, saved as the model; 0: off
    ema: Annotated[float, Interval(ge=0, lt=1), doc("0: off; e.g. 0.999")] = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "train")


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` section of params.yaml."""

    seed: Seed = 0
    split: Literal["train", "val"] = "val"
    crop: Annotated[int, Interval(ge=1, le=MAX_SIDE)] = (
        224  # at most the shorter side of every image (checked before any is read)
    )
    distortions: tuple[DistortionName, ...] = ()  # empty: every registered type
    batch_size: Annotated[int, Interval(ge=1, le=MAX_BATCH)] = 32
    device: DeviceName = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # scoring.PRECISIONS; fp16 on GPU only (docs/evaluation.md)
    baseline: bool = True  # also score the backbone before fine-tuning, zero-shot
    # real IQA sets: {name: clive, root: /path, [label: ...], [on_missing: exclude], ...loader options}
    datasets: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "evaluate")


@dataclass(frozen=True)
class PlusConfig:
    """The ``plus`` section of params.yaml: QualiCLIP+ prompt learning (docs/plus.md); opt-in.

    ``dataset`` names a labelled set as one ``evaluate.datasets`` entry does (``{name, root,
    **loader options}``); None (the default) runs nothing. The other defaults are the paper's.
    """

    dataset: dict | None = None
    epochs: Annotated[int, Interval(ge=1, le=MAX_EPOCHS)] = 50
    batch_size: Annotated[int, Interval(ge=1, le=MAX_BATCH)] = 8  # at most the train split (checked before training)
    lr: Annotated[float, Interval(gt=0, le=10)] = 2e-3
    crop: Annotated[int, Interval(ge=1, le=MAX_SIDE)] = 384  # smaller images are upscaled to it
    # augmented crops per training image whose frozen features are computed once; 0: fresh crops every step
    cached_crops: Annotated[int, Interval(ge=0, le=MAX_CACHED_CROPS)] = 8
    seed: Seed = 123  # context init, crops, batches and the random split (the paper's split seed)
    device: DeviceName = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "plus")
