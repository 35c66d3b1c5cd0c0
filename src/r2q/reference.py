"""The reference policy pi_ref as one answer to "its per-token log-probs for this batch".

A DPO reward beta * log pi(a_t|s_t)/pi_ref(a_t|s_t) needs log pi_ref of every scored token. They come from one
of four sources, and the trainer, `credit` and search ask a `Reference` without knowing which:

- `LiveReference`: a frozen model, run on the batch;
- `AdaptersOff`: the LoRA policy itself with its adapters switched off (the base weights; no second copy);
- `CachedReference`: per-token log-probs scored once and kept (the `--precompute-ref` disk cache);
- `NoReference`: reference-free, log pi_ref = 0, so the reward is beta * log pi.

Every source returns completion-aligned (S, L) float log-probs in the batch's row order; a cached one is
indexed by `slots`, the positions of the batch's completions in the cache's order ([chosen_0, rejected_0, ...]).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import refcache
from .progress import progress_bar
from .tokens import TokenBatch, completion_logps, examples_batch, pad_rows


class Reference:
    """Where log pi_ref comes from. `model` is the module that computes them live (what search decodes in lockstep
    with the policy), or None when nothing is run."""

    kind = "none"
    model: torch.nn.Module | None = None

    def logps(self, batch: TokenBatch, slots: Sequence[int]) -> torch.Tensor | None:
        """(S, L) per-token log pi_ref of the batch's completions, 0 where masked; None without a reference."""
        return None

    def __bool__(self) -> bool:
        return self.kind != "none"


class NoReference(Reference):
    """Reference-free: the implicit reward is beta * log pi (the log-probs of a uniform 'reference' drop out)."""


class LiveReference(Reference):
    """A frozen model, run on each batch (without gradients)."""

    kind = "model"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def logps(self, batch: TokenBatch, slots: Sequence[int]) -> torch.Tensor:
        at = batch.lengths.device  # the model may sit elsewhere (credit scores on the CPU)
        with torch.no_grad():
            return completion_logps(self.model, batch.to(_device(self.model))).to(at)


class AdaptersOff(Reference):
    """The policy with its LoRA adapters off: exactly the base it started from, while only adapters train.
    `policy` returns the current PEFT model (it may be re-wrapped by accelerate after this is made)."""

    kind = "adapters-off"

    def __init__(self, policy: Callable[[], torch.nn.Module]):
        self.policy = policy

    def logps(self, batch: TokenBatch, slots: Sequence[int]) -> torch.Tensor:
        lm = self.policy()
        with torch.no_grad(), lm.disable_adapter():
            return completion_logps(lm, batch)

    def as_module(self) -> torch.nn.Module:
        """The base as a module of its own (the same weights, adapters off in its every forward), for search to
        step in lockstep with the policy, each with its own KV cache. (`model` stays None: nothing but the policy
        is run, which is what the trainer and credit ask of it.)"""
        return _AdaptersOffModule(self.policy())


class _AdaptersOffModule(torch.nn.Module):
    """A PEFT model seen with its adapters switched off: a causal LM whose forward is the base's."""

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        self.peft = peft_model
        self.config = peft_model.config
        self.generation_config = getattr(peft_model, "generation_config", None)

    def get_output_embeddings(self):
        return self.peft.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        # no get_base_model here: code that unwraps PEFT to reach the HF model would run it with the adapters on
        if cache is not None:  # under the name the base's forward takes (transformers >= 5.25: `cache`)
            base = self.peft.get_base_model()
            kwargs["cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"] = cache
        with self.peft.disable_adapter():
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)


class CachedReference(Reference):
    """Per-token log-probs scored once, one 1-D tensor per completion in cache order. They cover a data set's
    completions only, so search (which scores new tokens) cannot use one."""

    kind = "cache"

    def __init__(self, rows: Sequence[torch.Tensor]):
        self.rows = list(rows)

    def logps(self, batch: TokenBatch, slots: Sequence[int]) -> torch.Tensor:
        return pad_rows([self.rows[s] for s in slots], batch.max_len).to(batch.lengths.device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_slots(idx: Sequence[int], pairs: bool) -> list[int]:
    """Cache positions of a batch's completions, in the batch's row order: pairs lay out the chosen rows of
    examples `idx`, then their rejected rows; single completions one row each."""
    return [2 * i for i in idx] + [2 * i + 1 for i in idx] if pairs else list(idx)


@torch.no_grad()
def score_reference(ref: torch.nn.Module, examples: Sequence, pad_id: int, share_prefix: bool, batch_size: int,
                    progress: bool = False, what: str = "reference log-probs") -> list[torch.Tensor]:
    """Per-token reference log-probs of every completion of `examples` (pairs), in cache order
    [chosen_0, rejected_0, chosen_1, ...], each cut to its completion's length, on the CPU."""
    ref.eval()
    out: list[torch.Tensor] = []
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task(what, total=len(examples), info="")
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            b = examples_batch(chunk, pad_id, share_prefix)
            lp = completion_logps(ref, b.to(ref.device)).cpu()
            B = len(chunk)
            for j in range(B):
                out += [lp[j, : b.lengths[j]], lp[B + j, : b.lengths[B + j]]]
            bar.update(task, advance=B)
    return out


def cached(path: Path, examples: Sequence, say=None) -> CachedReference | None:
    """The cache entry at `path` (see `refcache.cache_path`) when it exists and fits these examples, else None."""
    seqs = refcache.completion_sequences(examples)
    rows = refcache.try_load(path, len(seqs), say) if say else refcache.try_load(path, len(seqs))
    if rows is None or [len(x) for x in rows] != [len(c) for _, c in seqs]:
        return None  # not ours after all (a hash collision or a damaged file): score the reference
    return CachedReference(rows)


def precomputed(ref: torch.nn.Module, tokenizer, examples: Sequence, pad_id: int, cache_dir: str | Path | None, *,
                share_prefix: bool, batch_size: int, progress: bool = False, what: str = "reference log-probs",
                is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                say=None) -> tuple[CachedReference, bool]:
    """The reference's log-probs of `examples` from the disk cache, scored and written there first when missing
    (by the main process only; `barrier` makes every process look before it writes and read after). Returns the
    cached reference and whether it was found already."""
    path = refcache.cache_path(cache_dir, refcache.weights_hash(ref), tokenizer, examples)
    found = cached(path, examples, say)
    barrier()  # every process looks before the main one writes, so all take the same branch
    if found is not None:
        return found, True
    if is_main:
        refcache.save(path, score_reference(ref, examples, pad_id, share_prefix, batch_size, progress, what))
    barrier()
    return CachedReference(refcache.load(path)), False
