"""The scoring encoder: open_clip's ModifiedResNet rebuilt for inference, same features, less work.

It returns the features of the model's own encoder to float rounding (~1e-6 relative; scores
agree to 1e-5, tests/test_fast_encoder.py). What changes (figures: docs/evaluation.md):

* BatchNorm is folded into the convolutions before it is built (`inference.fold_batchnorm`).
* CLIP's mean/std normalisation is folded into the first convolution. Zero padding of the
  normalised image is padding of the raw image with the mean colour, so the image is padded with
  the mean colour and uint8 pixels go in as they are: one copy casts, pads and lays them out
  channels_last (no float [0, 1] image, no normalised image).
* On CPUs with oneDNN, a convolution and its ReLU, and a block's last convolution with the
  residual add and the ReLU, are single oneDNN calls (`torch.ops.mkldnn._convolution_pointwise`,
  the kernels torch.compile's CPU freezing emits) on channels_last activations. Elsewhere (GPU,
  ONNX export, torch.compile) the same graph is built from plain torch ops.
* The attention pool queries with the pooled (mean) token only, and the key and value
  projections move onto that query: per head h, logit_j = (W_k,h^T q_h)·x_j / sqrt(d) (the key
  bias adds the same constant to every logit, which softmax ignores) and the output is
  W_v,h (sum_j a_j x_j) + b_v,h (the weights sum to 1). The (HW+1) tokens are never projected:
  for RN50 at 512x384 that is 1.6 GMAC (~8 % of the encoder) fewer.

Lower precision comes from autocast, as for any module: under ``torch.autocast(dtype=bf16)``
the convolutions run in bf16 with bf16 copies of the weights, made once per dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import MIN_SIDE, OpenClipModule, resized_positional_embedding


def can_build(visual: nn.Module) -> bool:
    """Whether ``visual`` is an open_clip ModifiedResNet (its attention pool wrapped or not)."""
    return hasattr(getattr(visual, "attnpool", None), "q_proj") and hasattr(visual, "layer4")


def _onednn(x: torch.Tensor) -> bool:
    """Use the fused oneDNN kernels for ``x``: CPU, float32/bf16, and not being traced."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype convolutions run in: autocast's if it is on for ``device``, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


class FusedConv(nn.Module):
    """A convolution (BatchNorm already folded into it), then a residual add if given, then ReLU."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, stride: int = 1, padding: int = 0, relu: bool = True
    ):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.stride, self.padding, self.relu = (stride, stride), (padding, padding), relu
        self._cast: dict = {}  # (dtype, device) -> (weight, bias) copies for autocast

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool = True) -> FusedConv:
        assert conv.groups == 1 and conv.dilation == (1, 1), "ModifiedResNet has plain convolutions only"
        return cls(conv.weight, conv.bias, stride=conv.stride[0], padding=int(conv.padding[0]), relu=relu)

    def params_as(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        key = (dtype, self.weight.device)
        if key not in self._cast:  # frozen weights: one copy per dtype, not one cast per call
            bias = None if self.bias is None else self.bias.to(dtype)
            self._cast[key] = (self.weight.to(dtype), bias)
        return self._cast[key]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias = self.params_as(x.dtype)
        if _onednn(x):
            pointwise = torch.ops.mkldnn._convolution_pointwise
            act = "relu" if self.relu else "none"
            if residual is None:
                return pointwise(x, weight, bias, self.padding, self.stride, (1, 1), 1, act, [], "")
            return pointwise(x, residual, weight, bias, self.padding, self.stride, (1, 1), 1, "add", None, act, [], "")
        y = F.conv2d(x, weight, bias, self.stride, self.padding)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y


class Bottleneck(nn.Module):
    """open_clip's Bottleneck: 1x1, 3x3, (avg-pool), 1x1 + shortcut, each conv with its ReLU."""

    def __init__(self, block: OpenClipModule):
        super().__init__()
        self.conv1 = FusedConv.from_conv(block.conv1)
        self.conv2 = FusedConv.from_conv(block.conv2)
        self.conv3 = FusedConv.from_conv(block.conv3)  # its ReLU comes after the residual add
        self.stride = block.stride
        self.downsample = None if block.downsample is None else FusedConv.from_conv(block.downsample[1], relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        shortcut = x
        if self.stride > 1:  # anti-aliased stride: average-pool before the strided 1x1s
            out = F.avg_pool2d(out, self.stride)
            shortcut = F.avg_pool2d(x, self.stride)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.conv3(out, residual=shortcut)


class PooledAttention(nn.Module):
    """The attention pool with the mean token as the only query and k/v moved onto it."""

    k_weight: torch.Tensor  # buffers, registered in __init__
    v_weight: torch.Tensor
    v_bias: torch.Tensor

    def __init__(self, pool: OpenClipModule, pos_embedding: str):
        super().__init__()
        c = pool.q_proj.in_features
        self.heads, self.head_dim = pool.num_heads, c // pool.num_heads
        h, d = self.heads, self.head_dim
        self.q_proj, self.c_proj = pool.q_proj, pool.c_proj
        # (heads, head_dim, C) views of the key and value projections; the key carries 1/sqrt(d)
        self.register_buffer("k_weight", (pool.k_proj.weight.detach() * d**-0.5).reshape(h, d, c))
        self.register_buffer("v_weight", pool.v_proj.weight.detach().reshape(h, d, c))
        self.register_buffer("v_bias", pool.v_proj.bias.detach().reshape(h, d))
        self.positional_embedding = pool.positional_embedding if pos_embedding == "interpolate" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # (N, HW, C); a view when channels_last
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (N, T, C), T = HW+1
        if self.positional_embedding is not None:
            tokens = tokens + resized_positional_embedding(self.positional_embedding, hh, ww).to(tokens.dtype)
        q = self.q_proj(tokens[:, 0]).view(n, self.heads, self.head_dim)  # (N, h, d)
        # batched matmuls over heads rather than einsum: onnxruntime's Einsum is ~10x slower here
        u = (q.transpose(0, 1) @ self.k_weight.to(q.dtype)).transpose(0, 1)  # (N, h, C): W_k,h^T q_h / sqrt(d)
        attn = torch.softmax(u @ tokens.transpose(1, 2), dim=-1)  # (N, h, T)
        z = attn.to(tokens.dtype) @ tokens  # (N, h, C): attention-weighted token means
        v = (z.transpose(0, 1) @ self.v_weight.to(z.dtype).transpose(1, 2)).transpose(0, 1)  # (N, h, d)
        v = v + self.v_bias.to(z.dtype)
        return self.c_proj(v.reshape(n, c))  # (N, output_dim)


class FastEncoder(nn.Module):
    """Inference-only ModifiedResNet taking raw RGB: (N, 3, H, W) uint8, or float in [0, 1].

    ``normalizes_input`` tells `QualiCLIP.encode` to pass pixels unnormalised. ``portable``
    forces the plain-torch graph (what ONNX export traces). ``pos_embedding`` is the model's
    `ModelConfig.pos_embedding` ("drop" or "interpolate").
    """

    normalizes_input = True
    min_side = MIN_SIDE
    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, visual: OpenClipModule, mean, std, pos_embedding: str = "drop", portable: bool = False):
        super().__init__()
        if not can_build(visual) or any(isinstance(m, nn.BatchNorm2d) for m in visual.modules()):
            raise ValueError("FastEncoder needs a ModifiedResNet with its BatchNorm folded (inference.fold_batchnorm)")
        self.portable = portable
        self.output_dim = visual.output_dim
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.stem1 = FusedConv.from_conv(visual.conv1)  # on normalised input, zero padding (portable)
        # the same convolution on raw [0, 1] input padded with the mean colour: w/std, b - sum(w*mean/std)
        w = visual.conv1.weight.detach() / std.view(1, 3, 1, 1)
        b = visual.conv1.bias.detach() - (w * mean.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
        self.stem1_raw = FusedConv(w, b, stride=visual.conv1.stride[0])
        self.stem1_u8 = FusedConv(w / 255.0, b, stride=visual.conv1.stride[0])
        self.stem2 = FusedConv.from_conv(visual.conv2)
        self.stem3 = FusedConv.from_conv(visual.conv3)
        self.blocks = nn.Sequential(
            *[Bottleneck(b) for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4) for b in layer]
        )
        self.pool = PooledAttention(visual.attnpool, pos_embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or float RGB in [0, 1] -> features (N, output_dim)."""
        dtype = compute_dtype(x.device)
        x = self.stem(x, dtype)
        x = self.stem3(self.stem2(x))
        x = self.blocks(F.avg_pool2d(x, 2))
        return self.pool(x)

    def stem(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The first convolution (+ReLU) of raw pixels, normalisation folded in where possible."""
        if self.portable or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            x = x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)
            return self.stem1((x - self.mean.to(dtype)) / self.std.to(dtype))
        conv, scale = (self.stem1_u8, 255.0) if x.dtype == torch.uint8 else (self.stem1_raw, 1.0)
        n, _, h, w = x.shape
        padded = torch.empty((n, h + 2, w + 2, 3), dtype=dtype, device=x.device).permute(0, 3, 1, 2)
        fill = (self.mean * scale).to(dtype).view(1, 3, 1)  # the mean colour in the input's units
        padded[:, :, 0, :], padded[:, :, -1, :] = fill, fill
        padded[:, :, :, 0], padded[:, :, :, -1] = fill, fill
        padded[:, :, 1:-1, 1:-1] = x  # cast + layout in one copy
        return conv(padded)
