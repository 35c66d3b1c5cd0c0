"""Causal LMs stepped in lockstep with their KV caches, and the compute they spend.

A `Lockstep` holds N rows (prompts x beams or samples) and one or more models (policy, reference, base,
scorers) that all see the same tokens. Every model keeps its own HF Cache; `select(idx)` reorders or
duplicates the rows of every cache and of the attention mask by the same index, which is what keeps the
policy and the reference of reward-guided search on the same prefixes.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..tokens import attention_stance, eager_flex


@dataclass
class Compute:
    """What a search spent: model forward calls, token positions processed (all models), wall time."""

    forward_passes: int = 0
    tokens_processed: int = 0
    wall_time_s: float = 0.0
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    # when a list: every model call as (model index, rows, new positions), for replaying the same forwards bare
    trace: list[tuple[int, int, int]] | None = field(default=None, repr=False)

    def stop(self) -> Compute:
        self.wall_time_s = time.perf_counter() - self._t0
        return self

    def as_dict(self) -> dict[str, float]:
        return {"forward_passes": self.forward_passes, "tokens_processed": self.tokens_processed,
                "wall_time_s": round(self.wall_time_s, 4)}


def kv_bytes_per_token(model) -> int:
    """Bytes one position of `model`'s KV cache takes: keys and values of every layer."""
    c = model.config
    c = getattr(c, "get_text_config", lambda: c)()
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
    head_dim = getattr(c, "head_dim", None) or hidden // max(heads, 1)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 1)
    size = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * size


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: the GPU's free memory, or the host's available memory (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _forward_params(model):
    """The parameters of the forward that does the work: through a PEFT wrapper (whose forward takes **kwargs and
    passes them on) to its base model's."""
    inner = getattr(model, "get_base_model", None)
    return inspect.signature((inner() if callable(inner) else model).forward).parameters


def _cache_kwarg(model) -> str:
    """transformers >= 5.25 names the cache `cache` (`past_key_values` warns); older and custom models do not."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _last_logits_kwarg(model) -> dict[str, int]:
    """Ask for the last position's logits only (the LM head over a whole prompt is wasted work, and with a large
    vocabulary the biggest part of the prefill), where the model's forward takes `logits_to_keep` (every causal
    LM of transformers >= 4.56 does; a custom model may not)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) left-padded ids and their attention mask, as generation expects."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt: generation needs at least one prompt token")
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


class Lockstep:
    """Several causal LMs over the same N rows, each with its KV cache, advanced one token at a time."""

    def __init__(self, models: Sequence[torch.nn.Module], compute: Compute | None = None, room: int = 0):
        self.models = list(models)
        self.room = room  # positions the caches will grow by (the search's --max-new-tokens), allocated at once
        self.keys = [_cache_kwarg(m) for m in self.models]
        self.last_only = [_last_logits_kwarg(m) for m in self.models]
        self.caches: list = [None] * len(self.models)
        self.mask: torch.Tensor | None = None
        self.compute = compute or Compute()
        self.device = next(self.models[0].parameters()).device
        self.eager = [eager_flex(m) for m in self.models]  # FlexAttention on the CPU: run uncompiled

    def _run(self, i: int, ids: torch.Tensor, pos: torch.Tensor, tokens: int) -> torch.Tensor:
        if self.caches[i] is None:
            from .cache import new_cache  # transformers' cache classes: imported when a search first runs

            self.caches[i] = new_cache(self.models[i], self.room)
        kw = {self.keys[i]: self.caches[i]} if self.caches[i] is not None else {}
        with attention_stance(on=self.eager[i]):
            out = self.models[i](input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True, **kw,
                                 **self.last_only[i])
        self.caches[i] = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        self.compute.forward_passes += 1
        self.compute.tokens_processed += tokens
        if self.compute.trace is not None:
            self.compute.trace.append((i, ids.shape[0], ids.shape[1]))
        logits = out.logits[:, -1, :].float()
        # in place where the logits are a tensor of their own (the model's last-position output, as asked for): the
        # same values as into a new tensor (tested), without a new (N, V) tensor a step, which on CPU cost about as
        # much as the log-softmax itself (BENCHMARKS.md)
        return torch.log_softmax(logits, dim=-1, out=logits if logits.is_contiguous() else None)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Run every model over the (left-padded) prompts; next-token log-probs (N, V) per model."""
        self.attach([None] * len(self.models), mask)
        ids = ids.to(self.device)
        pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        tokens = int(self.mask.sum())
        out = [self._run(i, ids, pos, tokens) for i in range(len(self.models))]
        for i, lp in enumerate(out):  # once per search: damaged weights give NaN from the first forward on
            if torch.isnan(lp).any():
                from ..errors import UserError

                raise UserError(f"model {i} of the search ({type(self.models[i]).__name__}) gives NaN log-probs for "
                                "the prompts: its weights (or dtype) are damaged")
        return out

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, alive: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Append one token per row (N,) and return next-token log-probs per model. Rows with alive=False
        (finished) get a masked-out position, so they cost nothing in attention and change nothing."""
        if alive is None:
            col, pos, n = self._ones[: tokens.shape[0]], self.seen[:, None], tokens.shape[0]
        else:
            col = alive.to(self.device).long()[:, None].to(self.mask.dtype)
            pos, n = self.seen[:, None] * col, int(col.sum())
        self.mask = torch.cat([self.mask, col], dim=1)
        self.seen = self.seen + col[:, 0]  # each row's positions so far: the next one's position id
        ids = tokens.to(self.device)[:, None]
        return [self._run(i, ids, pos, n) for i in range(len(self.models))]

    def attach(self, caches: list, mask: torch.Tensor) -> None:
        """Continue from existing caches (one per model) over rows whose attention mask is `mask`."""
        self.caches, self.mask = list(caches), mask.to(self.device)
        self.seen = self.mask.sum(-1)
        self._ones = torch.ones(self.mask.shape[0], 1, dtype=self.mask.dtype, device=self.device)

    def select(self, idx: torch.Tensor, starts: list[int] | None = None) -> None:
        """Keep rows `idx` (N',), in that order, duplicating where repeated: every cache and the mask. starts: for
        each new row, the first position where it may differ from its source (the earlier ones are equal already,
        and so is the mask there), so that only later positions move."""
        from .cache import reorder

        idx = idx.to(self.device)
        self.mask, self.seen = self.mask.index_select(0, idx), self.seen.index_select(0, idx)
        if self._ones.shape[0] < idx.shape[0]:
            self._ones = torch.ones(idx.shape[0], 1, dtype=self.mask.dtype, device=self.device)
        reorder(self.caches, idx, starts)


def row_kv(cache, row: int, start: int = 0, end: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row's keys and values, positions [start, end), per layer: [(H, L, D), (H, L, D)], ...]."""
    return [(layer.keys[row, :, start:end].clone(), layer.values[row, :, start:end].clone()) for layer in cache.layers]


def stack_kv(rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]):
    """A batched DynamicCache from per-row KV of different lengths, left-padded, and its (N, L) mask."""
    from transformers import DynamicCache

    lengths = [r[0][0].shape[1] for r in rows]
    L = max(lengths)
    cache = DynamicCache()
    for layer in range(len(rows[0])):
        ks, vs = [], []
        for r, n in zip(rows, lengths):
            k, v = r[layer]
            pad = (0, 0, L - n, 0)  # left-pad the sequence dimension
            ks.append(torch.nn.functional.pad(k, pad))
            vs.append(torch.nn.functional.pad(v, pad))
        cache.update(torch.stack(ks), torch.stack(vs), layer)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, L - n:] = 1
    return cache, mask
