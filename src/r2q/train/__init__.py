"""Token-level DPO (and SFT) for any HF causal LM, resumable, distributed through accelerate.

config: the options (`TrainConfig`) and their joint checks; order: the data order; setup: building each part of a
run; rundir: the output directory (earlier runs, --overwrite, in-place runs, metrics on resume); loop: the
`Trainer` (steps, evaluation, logging, checkpoints and resume) and `train`.

Each name is imported when first used (PEP 562), so `from r2q.train import TrainConfig` (no torch) loads without
the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import Exports

if TYPE_CHECKING:  # never run; the demo's stage hashes read these statements to find the trainer's code
    from .config import TrainConfig  # noqa: F401
    from .loop import Trainer, TrainResult, pair_stats, train  # noqa: F401
    from .order import epoch_steps, example_tokens, micro_batches  # noqa: F401

_WHERE = {
    "config": ("TrainConfig",),
    "loop": ("TrainResult", "Trainer", "pair_stats", "train"),
    "order": ("epoch_steps", "example_tokens", "micro_batches"),
}
_EXPORTS = Exports(__name__, _WHERE)
_MODULE, __all__ = _EXPORTS.module, _EXPORTS.names
__getattr__, __dir__ = _EXPORTS.getattr, _EXPORTS.dir
