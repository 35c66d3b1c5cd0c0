"""Weak-to-strong chunk beam search (Zhou et al. 2024), the paper's Eq. 14 used as a search signal.

A base model (possibly large, untuned) proposes K continuations of L tokens from each of W beams; a small
tuned/untuned pair scores every prefix by its implicit reward beta * sum log pi_tuned/pi_untuned; the best W
prefixes per prompt survive. All three models share one tokenizer (token-level rewards need one vocabulary);
models with different tokenizers would need re-tokenising every chunk, which r2q does not do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..rewards import token_rewards
from .hypothesis import Hypothesis
from .lm import Lockstep, left_pad
from .sampling import draw, filter_logits


def chunk_beam_search(
    lock: Lockstep,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_ids: Sequence[int],
    beam_width: int,
    samples_per_beam: int,
    chunk_len: int,
    max_new_tokens: int,
    beta: float,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Hypothesis]:
    """The best hypothesis per prompt: its implicit-reward score and its log-probs under the tuned (logp) and the
    untuned (ref_logp) model, summed as the search went. lock.models = [base, tuned, untuned]."""
    if len(lock.models) != 3:
        raise ValueError("chunk beam search needs three models: base, tuned, untuned")
    (B, W, K), dev = (len(prompts), beam_width, samples_per_beam), lock.device
    N, eos = B * W * K, torch.tensor(list(eos_ids), device=dev)
    logps = lock.prefill(*left_pad(prompts, pad_id))
    # first chunk: W*K samples from the one prompt; later: K from each of the W survivors
    expand = torch.arange(B, device=dev).repeat_interleave(W * K)
    lock.select(expand)
    logps = [lp.index_select(0, expand) for lp in logps]
    seqs = torch.full((N, 0), pad_id, dtype=torch.long, device=dev)
    score = torch.zeros(N, device=dev)
    lp_sum = torch.zeros(N, 2, device=dev)  # log p of each prefix under the tuned and the untuned model
    # rows still decoding; among the K copies of a finished beam, the one that competes
    alive, first_copy = torch.ones(N, dtype=torch.bool, device=dev), torch.ones(N, dtype=torch.bool, device=dev)
    offset = torch.arange(B, device=dev)[:, None] * (W * K)  # each prompt's first row
    t = 0
    while t < max_new_tokens:
        for _ in range(min(chunk_len, max_new_tokens - t)):
            nxt, tok_lp = _draw(logps, alive, pad_id, temperature, top_k, top_p, generator)
            lp_sum = lp_sum + tok_lp
            score = score + token_rewards(tok_lp[:, 0], tok_lp[:, 1], beta)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            step_alive = alive
            alive = alive & ~torch.isin(nxt, eos)
            t += 1
            if not alive.any() or t >= max_new_tokens:
                break
            logps = lock.step(nxt, alive=step_alive)
        if not alive.any() or t >= max_new_tokens:
            break
        # keep the W best prefixes per prompt, then K copies of each
        best = torch.topk(_ranked(score, first_copy, B), W, dim=-1).indices + offset
        idx = best.reshape(-1).repeat_interleave(K)
        lock.select(idx)
        logps = [lp.index_select(0, idx) for lp in logps]
        seqs, score, alive, lp_sum = seqs[idx], score[idx], alive[idx], lp_sum[idx]
        first_copy = alive | (torch.arange(N, device=dev) % K == 0)
    out = []
    for i in (_ranked(score, first_copy, B).argmax(-1) + offset[:, 0]).tolist():
        row = seqs[i].tolist()
        n = next((j + 1 for j, x in enumerate(row) if x in eos_ids), len(row))
        out.append(Hypothesis(row[:n], float(score[i]), *lp_sum[i].tolist()))
    return out


def _draw(logps: list[torch.Tensor], alive: torch.Tensor, pad_id: int, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the base (pad where the row has ended) and its log-probs (N, 2) under the tuned and
    the untuned model (0 where the row has ended)."""
    nxt = draw(torch.softmax(filter_logits(logps[0], temperature, top_k, top_p), dim=-1), generator)
    nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
    tok_lp = torch.cat([logps[1].gather(-1, nxt[:, None]), logps[2].gather(-1, nxt[:, None])], dim=-1).float()
    return nxt, torch.where(alive[:, None], tok_lp, torch.zeros_like(tok_lp))


def _ranked(score: torch.Tensor, competes: torch.Tensor, B: int) -> torch.Tensor:
    """(B, rows per prompt) scores, -inf for the rows that do not compete."""
    return torch.where(competes, score, torch.full_like(score, float("-inf"))).view(B, -1)
