"""KV caches for search: a full-attention layer that grows in place and reorders beams into a second buffer.

Imported when a search first runs (it needs transformers' cache classes), not when r2q is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """A full-attention KV cache layer that writes each new position into preallocated room (doubling when full)
    instead of concatenating the whole cache every step, and reorders for beam search into a second buffer of the
    same size (no allocation per step, the filled part only), or, when most rows keep their parent, moves only the
    rows whose parent changed, from the first position where they differ. `keys` / `values` are views of the filled
    part, as a DynamicLayer's tensors would be."""

    reserve = 0  # positions past the prompt to allocate at the first step (see new_cache)

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self._k = self._v = self._alt = None
        self._n = 0
        self.keys = self.values = None
        self.is_initialized = True

    def _view(self):
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._k is None or self._k.shape[0] != key_states.shape[0]:
            self._k, self._v, self._alt = key_states, value_states, None  # the prefill: room comes on step 1
            self._n = new
            self._want = new + self.reserve
        else:
            if self._n + new > self._k.shape[-2]:
                self._grow(self._n + new)
            self._k[:, :, self._n : self._n + new] = key_states
            self._v[:, :, self._n : self._n + new] = value_states
            self._n += new
        self._view()
        return self.keys, self.values

    def _grow(self, need: int) -> None:
        self._rebuffer(max(need, 2 * self._k.shape[-2], getattr(self, "_want", 0)))

    def _rebuffer(self, cap: int, idx: torch.Tensor | None = None) -> None:
        """New buffers with room for `cap` positions, holding the filled part of every row (or of rows idx)."""
        for name in ("_k", "_v"):
            filled = getattr(self, name)[:, :, : self._n]
            buf = filled.new_empty(filled.shape[0] if idx is None else idx.shape[0], filled.shape[1], cap,
                                   filled.shape[-1])
            if idx is None:
                buf[:, :, : self._n] = filled
            else:
                torch.index_select(filled, 0, idx, out=buf[:, :, : self._n])
            setattr(self, name, buf)

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized and self._k is not None else 0

    def reorder_cache(self, beam_idx) -> None:
        """Row i takes row beam_idx[i]'s keys and values, every position (`move` leaves positions rows share)."""
        if not self.get_seq_length():
            return
        idx = beam_idx.to(self._k.device)
        rows, n = self._k.shape[0], self._n
        if idx.shape[0] != rows:  # rows duplicated or dropped: new buffers, with the room the old ones had
            self._rebuffer(max(self._k.shape[-2], getattr(self, "_want", 0)), idx)
            self._alt = None
        elif (moved := (idx != torch.arange(rows, device=idx.device)).nonzero().squeeze(1)).numel() * 2 < rows:
            # few rows take another's history: move those rows, in place (their sources gathered first, so a row
            # read is never one already overwritten)
            if moved.numel():
                src = idx.index_select(0, moved)
                for buf in (self._k, self._v):
                    part = buf[:, :, :n]
                    part.index_copy_(0, moved, part.index_select(0, src))
        else:  # into a second buffer of the same size, then swap: no allocation, the filled part only
            if self._alt is None or self._alt[0].shape != self._k.shape:
                self._alt = (torch.empty_like(self._k), torch.empty_like(self._v))
            ak, av = self._alt
            torch.index_select(self._k[:, :, :n], 0, idx, out=ak[:, :, :n])
            torch.index_select(self._v[:, :, :n], 0, idx, out=av[:, :, :n])
            self._alt = (self._k, self._v)
            self._k, self._v = ak, av
        self._view()

    def move(self, plan: Moves) -> None:
        """Apply `plan` (see Moves): the (row, position) entries it lists take their sources', in place, and the rows
        past its length leave (the buffers keep their room)."""
        if plan.full is not None:
            self.reorder_cache(plan.full)
            return
        if plan.dst is not None:
            if not self._k.is_contiguous():  # (the prefill's own tensors, before the room is made)
                self._rebuffer(self._k.shape[-2])
            rows, heads, cap, dim = self._k.shape
            dst, src = plan.flat(heads, cap)
            for buf in (self._k, self._v):
                flat = buf.view(rows * heads * cap, dim)
                flat.index_copy_(0, dst, flat.index_select(0, src))  # every source read before any write
        if plan.rows < self._k.shape[0]:
            self._k, self._v, self._alt = self._k[: plan.rows], self._v[: plan.rows], None
        self._view()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.get_seq_length():
            self._n = max(self._n + tokens_to_remove, 0)
            self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            self.reorder_cache(torch.arange(self._k.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices) -> None:
        if self.get_seq_length():
            self.reorder_cache(torch.as_tensor(indices).flatten())


@dataclass
class Moves:
    """A reorder of the rows of caches whose positions agree in part: row i takes row src[i]'s keys and values from
    position starts[i] on (the earlier ones are equal in both already: the same prompt and the same first generated
    tokens), and rows past len(src) leave. Listed as (row, position) entries to copy where that is less than half of
    what a full reorder copies; else `full`, the index for a full reorder."""

    rows: int
    full: torch.Tensor | None = None
    dst: torch.Tensor | None = None  # (P,) the rows and positions to write, and the rows to read them from
    src: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    _flat: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, src: list[int], starts: list[int], rows: int, n: int, device) -> Moves:
        moved = [i for i, (j, a) in enumerate(zip(src, starts)) if j != i and a < n]
        count = sum(n - starts[i] for i in moved)
        if len(src) > rows or (len(src) == rows and 2 * count >= rows * n):
            return cls(len(src), full=torch.tensor(src, device=device))
        if not moved:
            return cls(len(src))
        at = torch.tensor([starts[i] for i in moved], device=device)
        lengths = n - at
        dst = torch.tensor(moved, device=device).repeat_interleave(lengths, output_size=count)
        src_rows = torch.tensor([src[i] for i in moved], device=device).repeat_interleave(lengths, output_size=count)
        first = (at - lengths.cumsum(0) + lengths).repeat_interleave(lengths, output_size=count)
        return cls(len(src), None, dst, src_rows, torch.arange(count, device=device) + first)

    def flat(self, heads: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries as indices into a (rows * heads * cap, head_dim) view of a buffer: one per head."""
        if (heads, cap) not in self._flat:
            h = torch.arange(heads, device=self.pos.device)
            self._flat[heads, cap] = tuple(((r[:, None] * heads + h) * cap + self.pos[:, None]).view(-1)
                                           for r in (self.dst, self.src))
        return self._flat[heads, cap]


def reorder(caches: list, idx: torch.Tensor, starts: list[int] | None = None) -> None:
    """Row i of every cache takes row idx[i]'s keys and values (fewer rows than before: the others leave; more: rows
    are duplicated). starts[i]: the positions before it already agree in row i and its source, so they stay in
    place; caches of buffered layers then move only what differs, in place. Others reorder in full."""
    plans: dict[tuple[int, int], Moves] = {}  # (rows, positions): caches in lockstep share one plan
    for cache in caches:
        layers = getattr(cache, "layers", ())
        if starts is not None and layers and all(isinstance(x, BufferedLayer) and x.get_seq_length() for x in layers):
            key = (layers[0]._k.shape[0], layers[0]._n)
            if key not in plans:
                plans[key] = Moves.of(idx.tolist(), starts, *key, idx.device)
            for layer in layers:
                layer.move(plans[key])
        else:
            cache.reorder_cache(idx)


def new_cache(model, reserve: int = 0):
    """An empty cache for `model`: its own DynamicCache, with every plain full-attention layer buffered
    (sliding-window and other special layers are kept as the model makes them). reserve: positions to make room
    for beyond the prompt at the first step (the search's --max-new-tokens), so the buffer is allocated once."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config the cache cannot read: the model makes its own
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # mixed or special layers: leave them to transformers
    cache.layers = [BufferedLayer() for _ in cache.layers]
    for layer in cache.layers:
        layer.reserve = reserve
    return cache
