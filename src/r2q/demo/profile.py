"""The demo's profiles: every size and setting of a run, as one typed record (tiny, quick, full)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    """Sizes and settings of one demo profile. Everything up to `seeds` is shared by the seeds of a run; the seeds
    set the training randomness of every stage after the SFT policy (pairs, DPO, credit, search, dynamics)."""

    name: str
    # -- text, gold reward, the SFT policy and the judge: shared by every seed (made with `data_seed`)
    data_seed: int = 0
    n_gold: int = 8000  # labelled reviews for the gold classifier (and the judge's text; never the policy's)
    n_lm_reviews: int = 12000  # reviews whose passages the SFT policy learns
    vocab: int = 4096
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    lm_len: int = 64  # tokens per LM row: BOS, a passage of at most lm_len - 2 tokens, EOS
    sentences: tuple[int, int] = (2, 4)  # sentences per passage, drawn uniformly (see tasks.imdb_sentiment)
    sft_steps: int = 700
    sft_batch: int = 32
    sft_lr: float = 3e-3
    judge_layers: int = 2
    judge_steps: int = 300
    prompt_tokens: int = 8  # a prompt: BOS and the first tokens of a held-out passage
    eos_prompt_tokens: tuple[int, ...] = (4, 8, 16)  # prompt lengths of the check that EOS follows content
    n_eos_prompts: int = 128
    # -- per seed: preference pairs
    pair_samples: int = 4  # samples per prompt; the best and the worst by gold make a pair
    pair_tokens: int = 64  # cap on a sampled completion (enough that most samples end by EOS)
    n_pair_prompts: int = 2816
    n_pairs: int = 2048  # the pairs with the widest gold gap are kept
    n_eval_pairs: int = 256
    n_rt_pairs: int = 1024
    n_rt_eval: int = 256
    rt_candidates: int = 4200
    rt_tokens: int = 64
    # -- per seed: DPO (one epoch; the learning rate per beta keeps KL(pi_ref||pi) within kl_range nats)
    chosen_sft_steps: int = 60
    dpo_batch: int = 16
    dpo_warmup: int = 10
    betas: tuple[float, ...] = (0.1,)
    dpo_lrs: tuple[float, ...] = (4e-4,)  # one per beta
    kl_range: tuple[float, float] = (0.5, 8.0)  # the stated range of the final KL(pi_ref||pi), nats per sample
    eval_every: int = 16
    # -- per seed: the findings
    n_search: int = 128
    search_tokens: int = 64
    beams: tuple[int, ...] = (2, 4, 8, 16)
    length_penalties: tuple[float, ...] = (0.0, 1.0)
    temperatures: tuple[float, ...] = (1.0, 0.7)
    bon_n: int = 4
    mcts_sims: int = 8
    guided_alphas: tuple[float, ...] = (2.0, 4.0)
    budgets: tuple[int, ...] = (500, 1000)  # the equal-compute sweep: tokens processed per prompt
    n_sweep: int = 64  # prompts of the equal-compute sweep (the first of the search prompts)
    n_ref_samples: int = 128  # reference samples per KL estimate
    edit_words: int = 12
    placebo_words: int = 12
    n_boot: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)

    def dpo_lr(self, beta: float) -> float:
        return self.dpo_lrs[self.betas.index(beta)]

    def max_len(self, tokens: int) -> int:
        """Tokens of a prompt (up to twice the prompt length) and `tokens` completion tokens, with room to spare."""
        return 2 * max(self.eos_prompt_tokens + (self.prompt_tokens,)) + tokens + 8

    def settings(self) -> dict[str, Any]:
        """What the stages' cache keys hash: every setting but the name and the seeds (a run with more seeds
        reuses the stages of the seeds it shares)."""
        d = asdict(self)
        d.pop("name"), d.pop("seeds")
        return d


QUICK = Profile("quick")
PROFILES: dict[str, Profile] = {
    "quick": QUICK,
    # a step up: 2.4x the compute per token, 1.4x the LM text, 1.5x the pairs, three betas and more widths
    "full": replace(QUICK, name="full", n_lm_reviews=16500, vocab=8192, hidden=160, layers=6, sft_steps=1500,
                    sft_lr=2e-3, judge_layers=3, judge_steps=400, n_pair_prompts=4608, n_pairs=3000,
                    n_eval_pairs=512, chosen_sft_steps=100, dpo_warmup=20, betas=(0.1, 0.05, 0.5),
                    dpo_lrs=(4e-4, 4e-4, 8e-5), beams=(2, 3, 4, 6, 8, 16), bon_n=8, mcts_sims=16, edit_words=16,
                    placebo_words=16, budgets=(500, 1000, 2000), n_sweep=128),
    # the pipeline test: every stage and two seeds, at a size that runs in about a minute
    "tiny": replace(QUICK, name="tiny", n_gold=2000, n_lm_reviews=1500, vocab=1024, hidden=64, layers=2,
                    sft_steps=150, judge_layers=1, judge_steps=40, eos_prompt_tokens=(4, 8), n_eos_prompts=16,
                    pair_samples=2, pair_tokens=24, n_pair_prompts=400, n_pairs=256, n_eval_pairs=64,
                    n_rt_pairs=128, n_rt_eval=64, rt_candidates=600, rt_tokens=24, chosen_sft_steps=8,
                    dpo_lrs=(3e-3,), eval_every=8, n_search=16, search_tokens=16, beams=(2, 4), bon_n=2,
                    mcts_sims=3, guided_alphas=(2.0,), budgets=(150, 300), n_sweep=8, n_ref_samples=16, edit_words=8,
                    placebo_words=8, n_boot=100, seeds=(0, 1)),
}

# what --profile's help says of each profile (every one in PROFILES, in its order)
ABOUT = {"quick": "minutes on a laptop CPU", "full": "better fidelity",
         "tiny": "every stage at a test size; its findings are noise"}


def about_profiles() -> str:
    """The help line of --profile: every profile's name, with what it is for."""
    said = [f"{name} ({ABOUT[name]})" if name in ABOUT else name for name in PROFILES]
    return ", ".join(said[:-1]) + " or " + said[-1] if len(said) > 1 else said[0]
