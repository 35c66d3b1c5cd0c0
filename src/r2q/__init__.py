"""r2q: token-level DPO. Train a policy, see which tokens it rewards, search over it.

Implements "From r to Q*: Your Language Model is Secretly a Q-Function" (Rafailov et al., 2024).

Layers (tests/test_layers.py keeps them): a core of formulas and plumbing (tokens, rewards, losses, data,
models, checkpoint, ...) under what the commands compute (train, credit, search, tasks, theory checks), under the
views, under the command line and the demo. Imports sit at the top of each module; the only imports inside
functions are of heavy or optional packages (transformers, accelerate, datasets, pyarrow, matplotlib, sklearn,
scipy, tensorboard), so that `import r2q` and `r2q --help` stay fast and a missing extra fails only where used.
"""

from .errors import UserError
from .losses import dpo_loss, pair_stats, sft_loss
from .rewards import (
    aggregate_steps,
    cumulative_rewards,
    expected_reward,
    guided_logps,
    implicit_rewards,
    kl_ref_pi,
    likelihood_score,
    sequence_rewards,
    step_ends_from_text,
    step_rewards,
    token_rewards,
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
    "expected_reward",
    "flat_token_logps",
    "guided_logps",
    "implicit_rewards",
    "kl_ref_pi",
    "likelihood_score",
    "pair_stats",
    "sequence_rewards",
    "sft_loss",
    "step_ends_from_text",
    "step_rewards",
    "token_rewards",
]
