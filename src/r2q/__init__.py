"""r2q: token-level DPO. Train a policy, see which tokens it rewards, search over it.

Implements "From r to Q*: Your Language Model is Secretly a Q-Function" (Rafailov et al., 2024).

Layers (tests/test_layers.py keeps them): a core of formulas and plumbing (tokens, rewards, losses, data,
models, checkpoint, ...) under what the commands compute (train, credit, search, tasks, theory checks), under the
views, under the command line and the demo. Imports sit at the top of each module, with two exceptions. Heavy or
optional packages (transformers, accelerate, datasets, pyarrow, matplotlib, sklearn, scipy, tensorboard) are
imported inside the functions that use them, so that importing r2q stays fast and a missing extra fails only where
used. And the command line (cli.py) imports the engines (torch and every module that uses it) inside each command,
once its options are checked, so that `r2q --help`, `r2q version` and option errors answer without loading torch;
for this the options of every command are dataclasses in torch-free modules.

The names in _WHERE below, and those of the packages the command line goes through (r2q.train, r2q.demo,
r2q.theory, r2q.search), are imported when first used (PEP 562): `import r2q` loads no torch, `r2q.dpo_loss` does.
"""

from __future__ import annotations

from .errors import UserError  # noqa: F401  (in __all__)
from .lazy import Exports

__version__ = "0.1.0"

_WHERE = {
    "losses": ("dpo_loss", "pair_stats", "sft_loss"),
    "rewards": ("aggregate_steps", "cumulative_rewards", "expected_reward", "guided_logps", "implicit_rewards",
                "kl_ref_pi", "likelihood_score", "sequence_rewards", "step_ends_from_text", "step_rewards",
                "token_rewards"),
    "tokens": ("TokenBatch", "build_batch", "build_pair_batch", "completion_logps", "flat_token_logps"),
}
_EXPORTS = Exports(__name__, _WHERE, eager=("UserError", "__version__"))
_MODULE, __all__ = _EXPORTS.module, _EXPORTS.names
__getattr__, __dir__ = _EXPORTS.getattr, _EXPORTS.dir
