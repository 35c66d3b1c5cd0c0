"""Token-level DPO (and SFT) for any HF causal LM, resumable, distributed through accelerate.

config: the options (`TrainConfig`) and their joint checks; order: the data order; setup: building each part of a
run; rundir: the output directory (earlier runs, --overwrite, in-place runs, metrics on resume); loop: the
`Trainer` (steps, evaluation, logging, checkpoints and resume) and `train`.
"""

from .config import TrainConfig
from .loop import Trainer, TrainResult, pair_stats, train
from .order import epoch_steps, example_tokens, micro_batches

__all__ = ["TrainConfig", "TrainResult", "Trainer", "epoch_steps", "example_tokens", "micro_batches", "pair_stats",
           "train"]
