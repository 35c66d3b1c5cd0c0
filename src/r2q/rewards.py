"""Implicit token rewards of a DPO policy (the paper's Eq. 10) and what is built from them.

All tensors are completion-aligned: (S, L) with a bool mask (S, L) of real tokens (EOS included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from .errors import check_beta

T = TypeVar("T")  # a tensor, an array or a float: the formulas are elementwise


def token_rewards(policy_logps: T, ref_logps: T | None, beta: float, ref_term: bool = False) -> T:
    """The paper's Eq. 10, elementwise: r = beta * (log pi(a|s) - log pi_ref(a|s)) for tensors, arrays or floats.

    ref_logps=None is the reference-free case (pi_ref uniform up to a constant: r = beta * log pi).
    ref_term adds beta * log pi_ref back (r + beta log pi_ref = beta log pi: search on the policy's likelihood
    scaled by beta, the paper's Eq. 13 view of search as optimising Q*). Every reward in r2q is computed here.
    """
    check_beta(beta)
    if ref_logps is None:
        return beta * policy_logps
    r = beta * (policy_logps - ref_logps)
    return r + beta * ref_logps if ref_term else r


def likelihood_score(logps: Sequence[T]) -> T:
    """Eq. 13's search score of a token from the per-model log-probs [policy, ...]: log pi(a|s) of the policy."""
    return logps[0]


def guided_logps(base_logps: torch.Tensor, tuned_logps: torch.Tensor, ref_logps: torch.Tensor,
                  alpha: float = 1.0) -> torch.Tensor:
    """The paper's Eq. 14 (proxy tuning): log pi(a|s) for pi(a|s) proportional to
    pi_base(a|s) * (pi_tuned(a|s) / pi_ref(a|s))^alpha, normalised over the vocabulary.  (N, V) -> (N, V)

    alpha * log pi_tuned/pi_ref is the tuned pair's token reward at beta = alpha (`token_rewards`), so this is
    pi_base re-weighted by exp(r(s, a)): alpha = 1 gives pi_tuned itself when the base is the reference.
    """
    check_beta(alpha, "alpha", zero_ok=True)
    if alpha == 0:  # the tuned pair's reward weighted by 0: the base model alone (0 * -inf would be NaN)
        return torch.log_softmax(base_logps.float(), -1)
    return torch.log_softmax(base_logps.float() + token_rewards(tuned_logps.float(), ref_logps.float(), alpha), -1)


def implicit_rewards(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """`token_rewards` of every completion token, 0 where masked.  (S, L) -> (S, L)"""
    return token_rewards(policy_logps, ref_logps, beta).masked_fill(~mask, 0.0)


def cumulative_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q_t = sum_{i<=t} r_i: the implicit Q of the prefix up to potential-based shaping.  (S, L) -> (S, L)

    Entries past the end of a completion hold the sequence total.
    """
    return rewards.masked_fill(~mask, 0.0).cumsum(-1)


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t r_t over each completion: the sequence-level implicit reward.  (S, L) -> (S,)"""
    return rewards.masked_fill(~mask, 0.0).sum(-1)


def expected_reward(rewards: torch.Tensor, ref_probs: torch.Tensor | None = None) -> torch.Tensor:
    """E_{y~pi_ref}[R(y)] of sequence implicit rewards R(y) = beta * log pi(y|x)/pi_ref(y|x), which is exactly
    -beta * KL(pi_ref || pi) (so <= 0, and 0 only at pi = pi_ref): the reason rewards under reference samples fall.

    rewards (..., N): N completions of a prompt; ref_probs (..., N): their pi_ref(y|x) when the N completions are
    all of them (exact), or None when they are N samples of pi_ref (the Monte Carlo mean).  -> (...)
    """
    return rewards.mean(-1) if ref_probs is None else (ref_probs * rewards).sum(-1)


def kl_ref_pi(rewards: torch.Tensor, beta: float, ref_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(pi_ref || pi) in nats per completion, from the same identity: -E_ref[R] / beta.  (..., N) -> (...)"""
    check_beta(beta)
    return -expected_reward(rewards, ref_probs) / beta


def step_ids(step_ends: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index of the step each token belongs to, given (S, L) bool marks of the tokens that end a step.

    A step ends at (and includes) a marked token; the tokens after the last mark form a final step.
    Masked entries get -1.
    """
    ends = (step_ends & mask).long()
    ids = ends.cumsum(-1) - ends  # the ending token still belongs to its step
    return ids.masked_fill(~mask, -1)


def step_rewards(
    rewards: torch.Tensor, step_ends: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token rewards within each step.  -> (S, K) sums and (S, K) bool mask of real steps.

    This equals the difference of the cumulative reward q at consecutive step ends (implicit PRM step reward).
    """
    ids = step_ids(step_ends, mask)
    n_steps = ids.max(dim=-1).values + 1  # (S,)
    K = max(int(n_steps.max()) if n_steps.numel() else 0, 1)
    out = rewards.new_zeros(rewards.shape[0], K)
    out.scatter_add_(1, ids.clamp(min=0), rewards.masked_fill(~mask, 0.0))
    step_mask = torch.arange(K, device=rewards.device)[None, :] < n_steps[:, None]
    return out, step_mask


def aggregate_steps(step_sums: torch.Tensor, step_mask: torch.Tensor, how: str = "min") -> torch.Tensor:
    """One score per completion from its step rewards: "min" (PRM best-of-N), "sum" or "last".  -> (S,)"""
    if how == "sum":
        return step_sums.masked_fill(~step_mask, 0.0).sum(-1)
    if how == "min":
        return step_sums.masked_fill(~step_mask, float("inf")).min(-1).values
    if how == "last":
        last = (step_mask.long().sum(-1) - 1).clamp(min=0)
        return step_sums.gather(1, last[:, None]).squeeze(1)
    raise ValueError(f"unknown step aggregation {how!r}; use min, sum or last")


def step_ends_from_text(pieces: list[list[str]], delimiter: str = "\n") -> torch.Tensor:
    """(S, L) bool: token t ends a step if its text contains the delimiter. pieces[s][t] is a token's text."""
    if isinstance(pieces, str) or any(isinstance(row, str) for row in pieces):
        raise ValueError("pieces is a list of sequences, each a list of token texts; got a string where a list of "
                         "token texts belongs")
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string (every token text contains the empty one)")
    L = max((len(p) for p in pieces), default=0)
    out = torch.zeros(len(pieces), L, dtype=torch.bool)
    for s, row in enumerate(pieces):
        for t, piece in enumerate(row):
            out[s, t] = delimiter in piece
    return out
