"""The QualiCLIP losses on raw cosine similarities (docs/method.md, "The losses").

Similarities arrive as ``sims`` of shape (B, C=2, L, K, 2): sample, crop, level (1 = least
degraded), prompt pair, side (0 = positive prompt, 1 = negative prompt).
"""

from __future__ import annotations

import torch

from .schema import LossWeights as LossWeights  # declared with the params schema


def _level_pairs(levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (i, j) of every level pair i < j (j more degraded), not only neighbours."""
    i, j = torch.triu_indices(levels, levels, offset=1, device=device)
    return i, j


def ranking_losses(sims: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_pos, L_neg): less degraded closer to the positive prompt, more degraded to the negative."""
    i, j = _level_pairs(sims.shape[2], sims.device)
    pos, neg = sims[..., 0], sims[..., 1]  # (B, C, L, K)
    l_pos = torch.relu(pos[:, :, j] - pos[:, :, i] + margin).mean()
    l_neg = torch.relu(neg[:, :, i] - neg[:, :, j] + margin).mean()
    return l_pos, l_neg


def consistency_loss(sims: torch.Tensor, margin: float) -> torch.Tensor:
    """L_cons: the two overlapping crops at the same level get the same similarity (per side)."""
    return torch.relu((sims[:, 0] - sims[:, 1]).abs() - margin).mean()


def qualiclip_loss(sims: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """All terms and the weighted total ``loss``."""
    if sims.ndim != 5 or sims.shape[1] != 2 or sims.shape[-1] != 2:
        raise ValueError(f"expected similarities (B, 2, L, K, 2), got {tuple(sims.shape)}")
    l_pos, l_neg = ranking_losses(sims, w.margin_rank)
    l_cons = consistency_loss(sims, w.margin_cons)
    total = w.lambda_cons * l_cons + w.lambda_pos * l_pos + w.lambda_neg * l_neg
    return {"loss": total, "loss_cons": l_cons, "loss_pos": l_pos, "loss_neg": l_neg}
