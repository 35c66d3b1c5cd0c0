"""The options of `r2q generate` and what they may combine to: no torch here, so the CLI checks them at once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from enum import Enum

from ..config import check_options, flag, option
from ..errors import UserError, UserTypeError

METHODS = ("greedy", "sample", "beam", "reward-beam", "best-of-n", "chunk-beam", "guided", "mcts")
RANKINGS = ("likelihood", "reward", "reward-min", "reward-last", "external")
# what --budget sets for each method that has a width
WIDTH = {"best-of-n": "num_samples", "beam": "num_beams", "reward-beam": "num_beams", "chunk-beam": "num_beams",
         "mcts": "simulations"}
NEEDS_REF = ("reward-beam", "chunk-beam", "guided")
USES_BASE = ("chunk-beam", "guided")
SAMPLING = ("sample", "best-of-n", "chunk-beam", "guided")  # guided with --do-sample
BEAMS = ("beam", "reward-beam")
# the options only some methods read: set to another value than the default, with another method, an option would
# be ignored without a word (as transformers warns of a temperature given to greedy decoding)
USED_BY = {
    "num_beams": (*BEAMS, "chunk-beam"), "num_samples": ("best-of-n", "chunk-beam"),
    **dict.fromkeys(("temperature", "top_k", "top_p"), SAMPLING),
    **dict.fromkeys(("length_penalty", "early_stopping"), BEAMS),
    "ref_term": ("reward-beam", "mcts"), "ranking": ("best-of-n",), "alpha": ("guided",), "do_sample": ("guided",),
    "chunk_len": ("chunk-beam",),
    **dict.fromkeys(("simulations", "c_puct", "expand_top_k", "rollout", "rollout_len", "sims_per_call", "backup"),
                    ("mcts",)),
}


class EarlyStopping(str, Enum):
    """Beam early stopping, as transformers' `early_stopping`: False (stop once no beam can improve under the
    length penalty, with the heuristic's bound), True (stop when K hypotheses are done) or "never"."""

    FALSE = "false"
    TRUE = "true"
    NEVER = "never"

    @classmethod
    def of(cls, v: EarlyStopping | bool | str) -> EarlyStopping:
        if isinstance(v, cls):
            return v
        if isinstance(v, bool):
            return cls.TRUE if v else cls.FALSE
        try:
            return cls(str(v).lower())
        except ValueError:
            raise UserError(f"--early-stopping must be true, false or never, not {v!r}") from None

    @property
    def hf(self) -> bool | str:
        """The value transformers' GenerationConfig takes."""
        return {"false": False, "true": True}.get(self.value, "never")


@dataclass
class GenerateConfig:
    """Options of `r2q generate`; the CLI is generated from these fields. Making one checks every option's range
    and the combinations that need no model; `check_models` checks the rest once the models are known."""

    method: str = option("beam", f"Decoding method: {', '.join(METHODS)}", choices=METHODS)
    max_new_tokens: int = option(64, "Max tokens generated per prompt", ge=1)
    num_beams: int = option(4, "Beams (beam, reward-beam) or beam width W (chunk-beam)", ge=1)
    num_samples: int = option(4, "Samples per prompt (best-of-n) or per beam (chunk-beam)", ge=1)
    temperature: float = option(1.0, "Sampling temperature (> 0; --method greedy for argmax decoding)", gt=0)
    top_k: int = option(0, "Sample from the k most likely tokens only (0 = all)", ge=0)
    top_p: float = option(1.0, "Nucleus sampling mass, in (0, 1]", gt=0, le=1)
    beta: float = option(0.1, "beta of the implicit reward beta * log pi/pi_ref", gt=0)
    length_penalty: float = option(0.0, "Beam score = sum / length**penalty (0 = plain sum, the paper's Eq. 13)")
    early_stopping: EarlyStopping = option(EarlyStopping.FALSE, "Beam early stopping as in transformers: false, "
                                           "true or never", choices=tuple(e.value for e in EarlyStopping))
    ref_term: bool = option(False, "reward-beam / mcts: add beta * log pi_ref to the reward (= beta * log pi)")
    ranking: str = option("reward", f"best-of-n ranking: {', '.join(RANKINGS)}", choices=RANKINGS)
    scorer: str = option("", "External scorer for --ranking external: a reward-model directory (never its own "
                           "code), or module:function, "
                           "which imports and RUNS that Python code (the current directory is searched); it is "
                           "called as fn(prompts: list[str], completions: list[str]) -> list[float]")
    delimiter: str = option("\n", "Step delimiter for reward-min / reward-last (a chat model's end-of-turn token, "
                            "e.g. <|im_end|>, makes each turn a step)")
    alpha: float = option(1.0, "guided: decode from pi_base * (pi / pi_ref)**alpha, normalised (Eq. 14)", ge=0)
    do_sample: bool = option(False, "guided: sample from that distribution (with --temperature, --top-k, --top-p) "
                             "instead of taking its argmax")
    chunk_len: int = option(8, "chunk-beam: tokens per chunk", ge=1)
    simulations: int = option(64, "mcts: simulations per prompt", ge=1)
    c_puct: float = option(1.0, "mcts: exploration constant", ge=0)
    expand_top_k: int = option(16, "mcts: children per node (most likely tokens)", ge=1)
    rollout: bool = option(True, "mcts: value leaves by a greedy rollout (else by rewards so far)")
    rollout_len: int = option(8, "mcts: cap on each rollout's tokens, so a simulation costs at most this many "
                              "forward positions per model (0 = to EOS or --max-new-tokens); a capped rollout values "
                              "its leaf by the rewards it collected", ge=0)
    sims_per_call: int = option(1, "mcts: simulations of each prompt selected together, with a virtual loss, and "
                                "expanded by one forward per model (1: one after another)", ge=1)
    backup: str = option("max", "mcts: edge value = best return seen (max) or the mean", choices=("max", "mean"))
    budget: int = option(0, "Tokens processed per prompt (every model, prompt included, at most): sets the width, "
                         "--num-samples (best-of-n), --num-beams (beam, reward-beam, chunk-beam) or --simulations "
                         "(mcts), to the largest that fits when nothing ends early (0: use those options)", ge=0)
    seed: int = option(0, "Seed for sampling", ge=0)
    batch_size: int = option(8, "Prompts decoded together", ge=1)

    def __post_init__(self):
        self.early_stopping = EarlyStopping.of(self.early_stopping)
        check_options(self)
        external = self.method == "best-of-n" and self.ranking == "external"
        if external and not self.scorer:
            raise UserError("--ranking external needs --scorer")
        if self.scorer and not external:
            raise UserError("--scorer is used by --method best-of-n --ranking external only")
        if not self.delimiter and self.ranking in ("reward-min", "reward-last"):
            raise UserError(f"--delimiter is empty: --ranking {self.ranking} cuts steps at it (give the text that "
                            "ends a step, e.g. a newline or the chat template's end-of-turn token)")
        if why := self.unused():
            warnings.warn(why, UserWarning, stacklevel=3)
        if self.budget and self.method not in WIDTH:
            raise UserError(f"--budget sets a search width; {self.method} has none (its cost is fixed by "
                            "--max-new-tokens)")

    def unused(self) -> str | None:
        """What is wrong when an option is set (to other than its default) that this method does not read, else
        None. The CLI refuses it; in Python it is a warning, as transformers warns of a temperature given to greedy
        decoding (a sweep over methods may share one set of options)."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, methods in USED_BY.items():
            if getattr(self, name) != defaults[name] and self.method not in methods:
                return (f"{flag(name)} is not used by --method {self.method}, only by {', '.join(methods)}: drop it "
                        "or choose one of those methods")
        if self.method == "guided" and not self.do_sample:
            given = [flag(n) for n in ("temperature", "top_k", "top_p") if getattr(self, n) != defaults[n]]
            if given:
                return (f"{given[0]} shapes sampling, and guided takes the argmax unless --do-sample is given: add "
                        "--do-sample or drop it")
        steps = self.method == "best-of-n" and self.ranking in ("reward-min", "reward-last")
        if self.delimiter != defaults["delimiter"] and not steps:
            return ("--delimiter cuts completions into steps for --method best-of-n --ranking reward-min or "
                    "reward-last only")
        return None

    @property
    def width(self) -> int | None:
        """The option --budget sets for this method, or None for a method without a width."""
        return getattr(self, WIDTH[self.method]) if self.method in WIDTH else None


def check_models(cfg: GenerateConfig, ref: object | None, base: object | None) -> None:
    """What the config cannot check alone: whether the method has the models it needs. `ref` / `base` are the
    models or anything standing for them (their paths), so the CLI asks before loading them."""
    if not isinstance(cfg, GenerateConfig):
        raise UserTypeError(f"cfg must be a GenerateConfig (r2q.search.GenerateConfig(method=..., ...)); got "
                            f"{type(cfg).__name__}")
    if cfg.method in NEEDS_REF and ref is None:
        raise UserError(f"{cfg.method} needs a reference model (--ref)")
    if cfg.method == "best-of-n" and cfg.ranking in ("reward", "reward-min", "reward-last") and ref is None:
        raise UserError(f"best-of-n ranks by {cfg.ranking}, which needs a reference model (--ref); or rank by "
                        "--ranking likelihood")
    if base is not None and cfg.method not in USES_BASE:
        raise UserError("--base is the model chunk-beam and guided decode from; other methods do not use it")
