"""Ancestral sampling and greedy decoding, batched, recording every model's per-token log-probs.

The recorded log-probs are of the models' own (untempered, unfiltered) distributions, so the implicit
reward beta * log pi/pi_ref of a sample is exact whatever temperature or top-k/top-p drew it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .lm import Lockstep, left_pad


@dataclass
class Samples:
    """Per row: generated tokens (EOS included if reached) and each model's log-prob of each token."""

    tokens: list[list[int]]
    logps: list[list[torch.Tensor]]  # logps[m][row]: (len,) float, model m
    drawn_from: list[torch.Tensor]  # per row: (len,) log-probs of the tokens under the distribution decoded from


def filter_logits(logps: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Next-token log-weights after temperature, top-k and top-p (nucleus) filtering.  (N, V) -> (N, V)"""
    x = logps if temperature == 1.0 else logps / max(temperature, 1e-8)  # (x / 1.0 is x: no pass over N x V)
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def draw(weights: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None
         ) -> torch.Tensor:
    """One index per row with probability proportional to its weight, by inverting the cumulative sum at a uniform
    draw u (N,) in [0, 1), drawn from `generator` when not given (several times faster on CPU than
    torch.multinomial).  (N, V) -> (N,)"""
    w = weights.float().cpu()
    c = w.cumsum(-1)
    if u is None:
        u = torch.rand(w.shape[0], generator=generator)
    u = u[:, None] * c[:, -1:]
    # right=True: the first index whose cumulative weight exceeds u, so a zero-weight token is never drawn
    return torch.searchsorted(c, u, right=True).squeeze(-1).clamp(max=w.shape[-1] - 1).to(weights.device)


def sample(
    lock: Lockstep,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    proposal: int | Callable[[list[torch.Tensor]], torch.Tensor] = 0,
    repeat: int = 1,
) -> Samples:
    """Decode `repeat` continuations per prompt (rows prompt-major) from model `proposal` of the lockstep, or from
    proposal(every model's log-probs) -> (N, V) log-probs (guided decoding); every model of the lockstep scores
    each token. The prompt is run once and its cache copied."""
    ids, mask = left_pad(prompts, pad_id)
    dev = lock.device
    eos = torch.tensor(list(eos_ids), device=dev)
    logps = lock.prefill(ids, mask)
    if repeat > 1:
        idx = torch.arange(len(prompts), device=dev).repeat_interleave(repeat)
        lock.select(idx)
        logps = [lp.index_select(0, idx) for lp in logps]
    N = len(prompts) * repeat
    rows = torch.arange(N, device=dev)  # the original row of each row still decoded
    live = torch.ones(N, dtype=torch.bool, device=dev)  # rows of the batch that have not ended
    tok = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    lps = [torch.zeros(N, max_new_tokens, device=dev) for _ in lock.models]
    drawn = torch.zeros(N, max_new_tokens, device=dev) if callable(proposal) else None
    for t in range(max_new_tokens):
        lp = proposal(logps) if callable(proposal) else logps[proposal]
        if greedy:
            nxt = lp.argmax(-1)
        else:
            w = torch.softmax(filter_logits(lp, temperature, top_k, top_p), dim=-1)
            # one uniform per original row at every step: a row's sample does not depend on which rows have ended
            nxt = draw(w, u=torch.rand(N, generator=generator)[rows.cpu()])
        nxt = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        at = rows[live]
        tok[at, t] = nxt[live]
        # (gathered over every row, then the live ones kept: l[live] would copy N x V)
        if drawn is not None:  # a model's own log-probs are recorded below already
            drawn[at, t] = lp.gather(-1, nxt[:, None]).squeeze(-1)[live].float()
        for m, l in enumerate(logps):
            lps[m][at, t] = l.gather(-1, nxt[:, None]).squeeze(-1)[live].float()
        live = live & ~torch.isin(nxt, eos)
        if not live.any() or t + 1 == max_new_tokens:
            break
        if live.sum() * 4 <= 3 * len(live):  # a quarter of the batch or more has ended: those rows leave it
            keep = live.nonzero().squeeze(-1)
            lock.select(keep)
            rows, nxt, live = rows[keep], nxt[keep], live[keep]
        logps = lock.step(nxt, alive=live)
    steps = t + 1  # a row that did not end ran every step
    return _cut_at_eos(tok[:, :steps].cpu(), [x[:, :steps].cpu() for x in lps],
                       drawn[:, :steps].cpu() if drawn is not None else None, eos_ids, proposal)


def _cut_at_eos(tok: torch.Tensor, lps: list[torch.Tensor], drawn: torch.Tensor | None, eos_ids: Sequence[int],
                proposal: int | Callable) -> Samples:
    """Each row's tokens up to its first EOS (included), with the log-probs recorded for them."""
    out_tokens, out_lps, out_drawn = [], [[] for _ in lps], []
    for i in range(tok.shape[0]):
        row = tok[i].tolist()
        n = next((j + 1 for j, x in enumerate(row) if x in eos_ids), len(row))
        out_tokens.append(row[:n])
        if drawn is not None:
            out_drawn.append(drawn[i, :n])
        for m in range(len(lps)):
            out_lps[m].append(lps[m][i, :n])
    return Samples(out_tokens, out_lps, out_drawn if drawn is not None else out_lps[proposal])
