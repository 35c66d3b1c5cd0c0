"""The decoding settings the demo compares, as typed records (no torch: claims and the report read them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One decoding setting; `label` names it for people, the fields for code."""

    family: str  # sample, greedy, beam, reward-beam, best-of-n, mcts, guided, chunk-beam, human
    width: int | None = None  # beams, samples or simulations
    length_penalty: float | None = None
    temperature: float | None = None
    alpha: float | None = None
    budget: int | None = None  # tokens processed per prompt (--budget sets the width)
    full_rollouts: bool | None = None  # mcts: rollouts to the end (else capped at 8 tokens)

    @property
    def label(self) -> str:
        f = self.family
        if self.budget is not None:
            return f"{f} at {self.budget} tokens"
        if f == "sample":
            return f"sample T={self.temperature:g}"
        if f == "beam":
            return f"beam {self.width} lp {self.length_penalty:g}"
        if f == "guided":
            return f"guided alpha {self.alpha:g}"
        if f == "mcts":
            return f"mcts {self.width} sims" + (" (full rollouts)" if self.full_rollouts else "")
        if f in ("reward-beam", "best-of-n", "chunk-beam"):
            return f"{f} {self.width}"
        return f

    def config(self) -> dict[str, Any]:
        """GenerateConfig fields of this method."""
        f = self.family
        kw: dict[str, Any] = {"method": f}
        if self.budget is not None:
            kw["budget"] = self.budget
        elif f in ("beam", "reward-beam", "chunk-beam"):
            kw["num_beams"] = self.width
        elif f == "best-of-n":
            kw["num_samples"] = self.width
        elif f == "mcts":
            kw["simulations"] = self.width
        for name in ("length_penalty", "temperature", "alpha"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if f == "mcts":
            kw.update(expand_top_k=8, rollout_len=0 if self.full_rollouts else 8)
        if f == "chunk-beam":
            kw["num_samples"] = 2
        return kw


SWEEP = ("best-of-n", "beam", "reward-beam", "chunk-beam", "mcts")  # the methods with a width, at equal compute
