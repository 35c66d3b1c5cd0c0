"""Exact checks of the paper's theory on a token-level tree MDP (float64, enumeration, soft value iteration).

    mdp.py     the tree, reference and reward tables, soft value iteration, enumeration, KL by the chain rule
    dpo.py     DPO on exact or sampled Bradley-Terry pairs with r2q's loss code; tabular Newton fit; runs
    neural.py  the same with a tiny HF transformer, scored through r2q.tokens
    checks.py  the checks (CheckResult each) and the `check_search` hook for search methods
    report.py  `run`: tables (rich), report.html, summary.json, PNG figures

Entry point: ``run(out_dir, seed=0, quick=False, progress=True) -> dict`` (the summary).
"""

from .checks import CheckResult, check_search, exhaustive_search, greedy_search
from .mdp import TheoryMDP, TokenTree, build_tree, random_mdp, soft_value_iteration
from .report import TheoryConfig, run

__all__ = ["CheckResult", "TheoryConfig", "TheoryMDP", "TokenTree", "build_tree", "check_search", "exhaustive_search",
           "greedy_search", "random_mdp", "run", "soft_value_iteration"]
