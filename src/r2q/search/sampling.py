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
    x = logps / max(temperature, 1e-8)
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
    alive = torch.ones(N, dtype=torch.bool, device=dev)
    toks, lps, drawn = [], [[] for _ in lock.models], []
    for t in range(max_new_tokens):
        lp = proposal(logps) if callable(proposal) else logps[proposal]
        if greedy:
            nxt = lp.argmax(-1)
        else:
            w = torch.softmax(filter_logits(lp, temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(w.cpu(), 1, generator=generator).squeeze(-1).to(dev)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        toks.append(nxt)
        if callable(proposal):  # a model's own log-probs are recorded below already
            drawn.append(lp.gather(-1, nxt[:, None]).squeeze(-1).float())
        for m, l in enumerate(logps):
            lps[m].append(l.gather(-1, nxt[:, None]).squeeze(-1))
        step_alive = alive.clone()
        alive = alive & ~torch.isin(nxt, eos)
        if not alive.any() or t + 1 == max_new_tokens:
            break
        logps = lock.step(nxt, alive=step_alive)
    tok = torch.stack(toks, 1).cpu()
    lp_all = [torch.stack(x, 1).cpu() for x in lps]
    drawn_all = torch.stack(drawn, 1).cpu() if drawn else None
    out_tokens, out_lps, out_drawn = [], [[] for _ in lock.models], []
    for i in range(N):
        row = tok[i].tolist()
        n = len(row)
        for j, x in enumerate(row):
            if x in eos_ids:
                n = j + 1
                break
        out_tokens.append(row[:n])
        if drawn_all is not None:
            out_drawn.append(drawn_all[i, :n])
        for m in range(len(lock.models)):
            out_lps[m].append(lp_all[m][i, :n])
    return Samples(out_tokens, out_lps, out_drawn if drawn_all is not None else out_lps[proposal])
