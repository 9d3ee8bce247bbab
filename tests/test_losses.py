"""The losses of docs/method.md, "The losses", on hand-computed cases: margins, which pairs count, averaging."""

from __future__ import annotations

import pytest
import torch

from qualiclip.losses import LossWeights, consistency_loss, qualiclip_loss, ranking_losses


def sims_from(pos: list[list[float]], neg: list[list[float]]) -> torch.Tensor:
    """(B=1, C=2, L, K=1, 2) from per-crop lists of positive / negative similarities by level."""
    t = torch.stack(
        [torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)], dim=-1
    )  # (C, L, 2)
    return t[None, :, :, None, :]


def test_l_pos_counts_every_pair_i_below_j_on_both_crops():
    # crop 0: levels 1..3 with s+ = 0.50, 0.45, 0.52.  Pairs (i<j), margin 0.05:
    #   (1,2): 0.45-0.50+0.05 = 0      (1,3): 0.52-0.50+0.05 = 0.07      (2,3): 0.52-0.45+0.05 = 0.12
    # crop 1: constant 0.30 -> every pair costs the margin 0.05 (3 pairs)
    # mean over 2 crops × 3 pairs = (0.07 + 0.12 + 0.15) / 6
    sims = sims_from([[0.50, 0.45, 0.52], [0.30, 0.30, 0.30]], [[0.0] * 3, [0.0] * 3])
    l_pos, _ = ranking_losses(sims, margin=0.05)
    assert l_pos.item() == pytest.approx((0.07 + 0.12 + 0.15) / 6)
    # neighbours only would be (0 + 0.12 + 0.05 + 0.05) / 4: the non-neighbour pair (1,3) must count
    assert l_pos.item() != pytest.approx((0.12 + 0.10) / 4)


def test_l_neg_rewards_more_degraded_closer_to_negative():
    # crop 0: s- = 0.10, 0.20, 0.15; margin 0.1:
    #   (1,2): 0.10-0.20+0.1 = 0   (1,3): 0.10-0.15+0.1 = 0.05   (2,3): 0.20-0.15+0.1 = 0.15
    # crop 1: strictly increasing by 0.2 -> every pair satisfied beyond the margin: 0
    sims = sims_from([[0.0] * 3, [0.0] * 3], [[0.10, 0.20, 0.15], [0.0, 0.2, 0.4]])
    _, l_neg = ranking_losses(sims, margin=0.1)
    assert l_neg.item() == pytest.approx((0.05 + 0.15) / 6)


def test_ranking_zero_margin_ignores_ties_and_correct_orders():
    sims = sims_from([[0.5, 0.4, 0.3], [0.2, 0.2, 0.1]], [[0.1, 0.2, 0.3], [0.0, 0.0, 0.5]])
    l_pos, l_neg = ranking_losses(sims, margin=0.0)
    assert l_pos.item() == 0.0 and l_neg.item() == 0.0


def test_l_cons_same_level_both_sides_with_margin():
    # level 1: |0.50-0.40| = 0.10 (pos), |0.20-0.20| = 0 (neg); level 2: |0.30-0.33| = 0.03, |0.1-0.0| = 0.1
    # margin 0.05: relu(0.05) + 0 + relu(-0.02) + relu(0.05) over 2 levels × 2 sides
    sims = sims_from([[0.50, 0.30], [0.40, 0.33]], [[0.20, 0.10], [0.20, 0.00]])
    assert consistency_loss(sims, margin=0.05).item() == pytest.approx((0.05 + 0.05) / 4)
    assert consistency_loss(sims, margin=0.0).item() == pytest.approx((0.10 + 0.03 + 0.10) / 4)


def test_terms_are_averaged_over_prompt_pairs():
    one = sims_from([[0.50, 0.45, 0.52], [0.30, 0.30, 0.30]], [[0.10, 0.20, 0.15], [0.0, 0.2, 0.4]])
    perfect = sims_from([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]], [[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]])
    two = torch.cat([one, perfect], dim=3)  # K = 2: the second pair costs nothing
    w = LossWeights(margin_rank=0.05, margin_cons=0.0)
    a, b = qualiclip_loss(one, w), qualiclip_loss(two, w)
    for key in ("loss_pos", "loss_neg"):
        assert b[key].item() == pytest.approx(a[key].item() / 2)


def test_total_is_the_weighted_sum():
    sims = torch.rand(3, 2, 5, 7, 2, dtype=torch.float64)
    w = LossWeights(margin_rank=0.1, margin_cons=0.02, lambda_cons=0.5, lambda_pos=2.0, lambda_neg=3.0)
    out = qualiclip_loss(sims, w)
    expected = 0.5 * out["loss_cons"] + 2.0 * out["loss_pos"] + 3.0 * out["loss_neg"]
    assert out["loss"].item() == pytest.approx(expected.item())


def test_batch_mean_matches_per_sample_mean():
    sims = torch.rand(4, 2, 5, 7, 2, dtype=torch.float64)
    w = LossWeights()
    whole = qualiclip_loss(sims, w)["loss"]
    per = torch.stack([qualiclip_loss(sims[b : b + 1], w)["loss"] for b in range(4)]).mean()
    assert whole.item() == pytest.approx(per.item())


def test_wrong_shape_names_expected_layout():
    with pytest.raises(ValueError, match=r"\(B, 2, L, K, 2\)"):
        qualiclip_loss(torch.zeros(2, 5, 7, 2), LossWeights())
