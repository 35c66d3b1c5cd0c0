"""Preference and SFT losses written on token-level quantities (pure tensor functions).

The DPO family takes sequence implicit rewards R = sum_t beta * log pi(a_t|s_t)/pi_ref(a_t|s_t) of the
chosen and rejected completions, shape (B,). Summing token rewards (never averaging) is what makes the
per-prompt potential V*(s_0) cancel in the comparison (the paper's Eq. 13 and Theorem 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rewards import implicit_rewards, kl_ref_pi, sequence_rewards

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
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number; got {beta!r}")
    if label_smoothing and loss_type != "cdpo":
        raise ValueError(f"label_smoothing is for loss_type='cdpo', not {loss_type!r}")
    margin = chosen_rewards - rejected_rewards
    if loss_type == "sigmoid":
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


def pair_stats(pol: torch.Tensor, ref: torch.Tensor | None, mask: torch.Tensor, beta: float, loss_type: str,
               label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and detached per-pair metrics by name, each (B,); `r2q train` logs their means.

    pol, ref: (2B, L) per-token log-probs of the chosen rows then the rejected rows (ref None: reference-free);
    mask (2B, L)."""
    B = pol.shape[0] // 2
    r = implicit_rewards(pol, ref, mask, beta)
    R = sequence_rewards(r, mask)
    losses = dpo_loss(R[:B], R[B:], beta, loss_type, label_smoothing)
    with torch.no_grad():
        n = mask.sum(-1).float()
        lp = sequence_rewards(pol, mask)
        log_ratio = R / beta  # log pi(y|x) - log pi_ref(y|x) per sequence
        ratio = torch.exp(log_ratio.clamp(max=50.0))
        stats = {
            "loss": losses.detach(), "rewards/chosen": R[:B], "rewards/rejected": R[B:],
            "rewards/margins": R[:B] - R[B:], "rewards/accuracies": (R[:B] > R[B:]).float(),
            "rewards/chosen_token_mean": R[:B] / n[:B], "rewards/rejected_token_mean": R[B:] / n[B:],
            "logps/chosen": lp[:B], "logps/rejected": lp[B:],
            "logps/chosen_token_mean": lp[:B] / n[:B], "logps/rejected_token_mean": lp[B:] / n[B:],
            # estimates on the data, exact in expectation when the completions are samples of pi_ref:
            # KL(pi_ref||pi) = E_ref[-log ratio], KL(pi||pi_ref) = E_ref[ratio * log ratio]
            "kl/ref_pi_est": kl_ref_pi(torch.stack([R[:B], R[B:]], -1), beta),
            "kl/pi_ref_est": (ratio[:B] * log_ratio[:B] + ratio[B:] * log_ratio[B:]) / 2,
        }
    return losses, stats
