"""Preference and SFT losses written on token-level quantities (pure tensor functions).

The DPO family takes sequence implicit rewards R = sum_t beta * log pi(a_t|s_t)/pi_ref(a_t|s_t) of the
chosen and rejected completions, shape (B,). Summing token rewards (never averaging) is what makes the
per-prompt potential V*(s_0) cancel in the comparison (the paper's Eq. 13 and Theorem 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "cdpo")


def dpo_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss (B,) from sequence implicit rewards (B,) (beta already applied).

    sigmoid: -log sigmoid(R_w - R_l)                                (DPO)
    cdpo:    -(1-eps) log sigmoid(R_w - R_l) - eps log sigmoid(R_l - R_w)   (conservative DPO, eps=label_smoothing)
    ipo:     (h - 1/(2 beta))^2 with h = (R_w - R_l) / beta, the summed log-ratio difference (IPO)
    """
    margin = chosen_rewards - rejected_rewards
    if loss_type == "sigmoid":
        if label_smoothing:
            raise ValueError("label_smoothing is for loss_type='cdpo'")
        return -F.logsigmoid(margin)
    if loss_type == "cdpo":
        eps = label_smoothing
        if not 0.0 <= eps < 0.5:
            raise ValueError("cdpo label_smoothing must be in [0, 0.5)")
        return -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    if loss_type == "ipo":
        return (margin / beta - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of the completion tokens: per token over the batch (mean,
    -sum(log pi * mask) / sum(mask)) or summed (sum: for a trainer that divides by a global token count)."""
    nll = -(logps.masked_fill(~mask, 0.0)).sum()
    if reduction == "sum":
        return nll
    if reduction == "mean":
        return nll / mask.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; use mean or sum")
