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

import importlib
from typing import Any

_WHERE = {
    "checks": ("CheckResult", "check_search", "exhaustive_search", "greedy_search"),
    "config": ("TheoryConfig",),
    "mdp": ("TheoryMDP", "TokenTree", "build_tree", "random_mdp", "soft_value_iteration"),
    "report": ("run",),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name in _MODULE:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
