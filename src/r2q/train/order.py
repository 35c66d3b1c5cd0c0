"""The data order of a run: a function of (seed, epoch) only, so resuming needs nothing but the step number.

One optimizer step consumes a global batch of `batch_size * processes * grad_accum` examples, split into
length-sorted micro-batches.
"""

from __future__ import annotations

import torch


def example_tokens(ex) -> int:
    """Tokens of one example as training lays it out (prompt once, then its completion or both completions):
    the length batches are sorted by."""
    if hasattr(ex, "chosen_ids"):
        return len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids)
    return len(ex.prompt_ids) + len(ex.completion_ids)


def epoch_steps(lengths: list[int], global_batch: int, parts: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: indices shuffled, sorted by length within windows of 16 batches (so a
    micro-batch pads little), chunked, and the batches shuffled. A last batch with fewer than `parts`
    examples (one per micro-batch) is dropped."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = global_batch * 16
    order: list[int] = []
    for i in range(0, len(perm), window):
        order += sorted(perm[i : i + window], key=lambda j: lengths[j])
    steps = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    steps = [s for s in steps if len(s) >= parts]
    return [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]


def micro_batches(step: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Split a global batch into `parts` contiguous length-sorted micro-batches of near-equal size."""
    step = sorted(step, key=lambda j: lengths[j])
    n, out, i = len(step), [], 0
    for k in range(parts):
        size = n // parts + (1 if k < n % parts else 0)
        out.append(step[i : i + size])
        i += size
    return out
