"""ONNX export of a scorer: image encoder and prompt head as one graph, any height and width.

The graph takes what an image decoder gives and returns scores, so a deployment needs only
numpy and onnxruntime (docs/evaluation.md, "ONNX: scoring without torch"):

* input ``image``: uint8 (N, H, W, 3) RGB, H and W free (each at least 32 for a ResNet);
* output ``score``: float64 (N,) in [0, 1], higher is better;
* output ``pair_probs``: float64 (N, K), each prompt pair's probability of its positive prompt
  (``score`` is their mean).

The scaling, the CLIP normalisation and the prompt features are inside the graph. The export
traces the scorer's plain-torch graph (`FastEncoder` with ``portable=True``), with torch's
dynamo exporter (``torch.onnx.export(dynamo=True)``). The TorchScript exporter (``dynamo=False``)
also handles the dynamic sizes and scores as closely (measured), but it is deprecated in
torch 2.14; it exports in 0.1 s against ~5 s for the tiny model (~10 s for RN50).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QualiclipError
from .inference import inference_copy
from .model import MIN_SIDE, QualiCLIP

OPSET = 18
INPUT, OUTPUTS = "image", ("score", "pair_probs")


class OnnxExportError(QualiclipError):
    """A model or output path that cannot be exported; the message names the fix."""


class ExportableScorer(nn.Module):
    """uint8 (N, H, W, 3) RGB -> (score (N,), pair_probs (N, K)), both float64."""

    prompts: torch.Tensor  # buffers, registered in __init__
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: QualiCLIP):
        super().__init__()
        scorer = inference_copy(model)
        self.encoder = copy.copy(scorer.visual)  # shallow: shares the weights, own `portable` flag
        self.encoder.portable = True
        self.normalizes = getattr(self.encoder, "normalizes_input", False)
        self.register_buffer("prompts", scorer.prompt_features.float())  # (2K, D), L2-normalised
        self.register_buffer("mean", scorer.mean)
        self.register_buffer("std", scorer.std)
        self.logit_scale = float(scorer.cfg.logit_scale)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        if not self.normalizes:
            x = (x.float() / 255.0 - self.mean) / self.std
        feats = F.normalize(self.encoder(x).float(), dim=-1)  # (N, D)
        sims = (feats @ self.prompts.T).view(feats.shape[0], -1, 2)  # (N, K, 2)
        pair_probs = torch.softmax(self.logit_scale * sims.double(), dim=-1)[..., 0]  # (N, K)
        return pair_probs.mean(dim=-1), pair_probs


def export_onnx(model: QualiCLIP, out: str | Path) -> Path:
    """Write ``model`` as an ONNX scorer to ``out`` (atomically) and return the path."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise OnnxExportError(f"--out must end in .onnx, got {out.name}")
    _require_exporter()
    net = ExportableScorer(model).eval()
    # batch 2 and H != W: the exporter specialises sizes 0/1 and equal sizes into constants
    example = torch.randint(0, 256, (2, 3 * MIN_SIDE, 4 * MIN_SIDE, 3), dtype=torch.uint8)
    dims = {
        0: torch.export.Dim("batch", min=1),
        1: torch.export.Dim("height", min=MIN_SIDE),
        2: torch.export.Dim("width", min=MIN_SIDE),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )
    assert program is not None  # dynamo=True returns the exported program
    program.save(str(tmp))
    tmp.replace(out)
    return out


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's harmless warnings (sympy failing to simplify the RN50 shape
    inequalities prints full tracebacks; constant folding skips a Split), errors still show."""
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _require_exporter() -> None:
    try:  # the onnx extra is optional: imported only to say how to install it when it is missing
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise OnnxExportError(
            f"ONNX export needs the onnx extra ({exc.name} is not installed). Fix: pip install -e '.[onnx]'"
        ) from None
