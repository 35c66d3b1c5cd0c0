"""One decoded answer, from the search method that found it to the line `r2q generate` writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Hypothesis:
    """A completion of one prompt: its tokens, what the method ranked it by, and each model's summed log-prob of
    it as the search computed them (None where the method did not run that model; `generate` then rescores it).

    `generate` fills the rest: the prompt and decoded text, the implicit reward beta * log pi(y|x)/pi_ref(y|x)
    (with a reference) and the prompt's share of the batch's compute.
    """

    token_ids: list[int]
    score: float
    logp: float | None = None  # log pi(y|x), summed over tokens
    ref_logp: float | None = None  # log pi_ref(y|x)
    prompt: Any = ""  # the prompt as given: a string, or a list of chat messages
    text: str = ""
    reward: float | None = None  # beta * (logp - ref_logp), when a reference is given
    compute: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def as_dict(self) -> dict[str, Any]:
        """The output line: prompt, text, token_ids, logp, reward, score, num_tokens and compute_* fields."""
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids, "logp": self.logp,
                "reward": self.reward, "score": self.score, "num_tokens": self.num_tokens,
                **{f"compute_{k}": v for k, v in self.compute.items()}}


Generation = Hypothesis  # the name r2q 0.1 gave `generate`'s results
