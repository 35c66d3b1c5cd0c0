"""r2q: token-level DPO. Train a policy, see which tokens it rewards, search over it.

Implements "From r to Q*: Your Language Model is Secretly a Q-Function" (Rafailov et al., 2024).
"""

from .errors import UserError
from .losses import dpo_loss, sft_loss
from .rewards import (
    aggregate_steps,
    cumulative_rewards,
    implicit_rewards,
    sequence_rewards,
    step_ends_from_text,
    step_rewards,
)
from .tokens import TokenBatch, build_batch, build_pair_batch, completion_logps, flat_token_logps

__version__ = "0.1.0"

__all__ = [
    "TokenBatch",
    "UserError",
    "__version__",
    "aggregate_steps",
    "build_batch",
    "build_pair_batch",
    "completion_logps",
    "cumulative_rewards",
    "dpo_loss",
    "flat_token_logps",
    "implicit_rewards",
    "sequence_rewards",
    "sft_loss",
    "step_ends_from_text",
    "step_rewards",
]
