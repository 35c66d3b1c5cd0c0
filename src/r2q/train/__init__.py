"""Token-level DPO (and SFT) for any HF causal LM, resumable, distributed through accelerate.

config: the options (`TrainConfig`) and their joint checks; order: the data order; setup: building each part of a
run; rundir: the output directory (earlier runs, --overwrite, in-place runs, metrics on resume); loop: the
`Trainer` (steps, evaluation, logging, checkpoints and resume) and `train`.

Each name is imported when first used (PEP 562), so `from r2q.train import TrainConfig` (no torch) loads without
the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # never run; the demo's stage hashes read these statements to find the trainer's code
    from .config import TrainConfig  # noqa: F401
    from .loop import Trainer, TrainResult, pair_stats, train  # noqa: F401
    from .order import epoch_steps, example_tokens, micro_batches  # noqa: F401

_WHERE = {
    "config": ("TrainConfig",),
    "loop": ("TrainResult", "Trainer", "pair_stats", "train"),
    "order": ("epoch_steps", "example_tokens", "micro_batches"),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name in _MODULE:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
