"""Decoding with search over the DPO policy: one entry point, `generate`, for every method.

Methods: greedy, sample, beam (likelihood search, the paper's search over Q*), reward-beam (beam search on
the implicit reward beta * log pi/pi_ref, optionally + beta * log pi_ref), best-of-n, chunk-beam
(weak-to-strong), guided (Eq. 14: a base model steered token by token by the policy/reference ratio), mcts.
All are batched over prompts with KV caches; all report their compute.

This file only names where things live; each is imported when first used (PEP 562), so the options
(`r2q.search.config`, no torch) load without the engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import Exports

if TYPE_CHECKING:  # never run; the demo's stage hashes read these statements to find the search's code
    from .config import METHODS, RANKINGS, WIDTH, EarlyStopping, GenerateConfig, check_models  # noqa: F401
    from .decode import (  # noqa: F401
        MAX_WIDTH,
        check_memory,
        cost_per_prompt,
        decoding_rows,
        encode_prompts,
        generate,
        generate_ids,
        score_sequences,
        sequence_logps,
        with_budget,
    )
    from .hypothesis import Generation, Hypothesis  # noqa: F401
    from .methods import REGISTRY, Job, Method  # noqa: F401

_WHERE = {
    "config": ("METHODS", "RANKINGS", "WIDTH", "EarlyStopping", "GenerateConfig", "check_models"),
    "hypothesis": ("Hypothesis", "Generation"),
    "methods": ("Job", "Method", "REGISTRY"),
    "decode": ("generate", "generate_ids", "encode_prompts", "score_sequences", "sequence_logps",
               "cost_per_prompt", "with_budget", "decoding_rows", "check_memory", "MAX_WIDTH"),
}
_EXPORTS = Exports(__name__, _WHERE)
_MODULE, __all__ = _EXPORTS.module, _EXPORTS.names
__getattr__, __dir__ = _EXPORTS.getattr, _EXPORTS.dir
