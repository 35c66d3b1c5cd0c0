"""Exact checks of the paper's theory on a token-level tree MDP (float64, enumeration, soft value iteration).

    mdp.py     the tree, reference and reward tables, soft value iteration, enumeration, KL by the chain rule
    dpo.py     DPO on exact or sampled Bradley-Terry pairs with r2q's loss code; tabular Newton fit; runs
    neural.py  the same with a tiny HF transformer, scored through r2q.tokens
    checks.py  the checks (CheckResult each) and the `check_search` hook for search methods
    report.py  `run`: tables (rich), report.html, summary.json, PNG figures
    config.py  `TheoryConfig`, the options of `r2q theory` (no torch)

Entry point: ``run(out_dir, seed=0, quick=False, progress=True) -> dict`` (the summary). Each name is imported
when first used (PEP 562), so `TheoryConfig` loads without torch.
"""

from __future__ import annotations

from ..lazy import Exports

_WHERE = {
    "checks": ("CheckResult", "check_search", "exhaustive_search", "greedy_search"),
    "config": ("TheoryConfig",),
    "mdp": ("TheoryMDP", "TokenTree", "build_tree", "random_mdp", "soft_value_iteration"),
    "report": ("run",),
}
_EXPORTS = Exports(__name__, _WHERE)
_MODULE, __all__ = _EXPORTS.module, _EXPORTS.names
__getattr__, __dir__ = _EXPORTS.getattr, _EXPORTS.dir
