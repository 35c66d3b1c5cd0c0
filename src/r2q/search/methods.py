"""Every decoding method of `r2q generate` in one table: the function that runs it on a batch of prompts and the
model of what it costs, side by side.

A method's run takes a `Job` (the models, the options and the shared state of one batch) and the batch's prompt
ids, and returns one `Hypothesis` per prompt. Its cost model gives (a, b): a prompt of P tokens costs at most
a + b * width tokens processed (every model's forward positions, as `Compute` counts them, rescoring included),
reached when no output ends before --max-new-tokens; b = 0 for a method without a width (WIDTH). Its rows are
the decoding rows one prompt holds side by side (each with a KV cache and next-token log-probs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..rewards import guided_logps, likelihood_score, token_rewards
from .beam import beam_search
from .bon import checked_scores, sample_scores
from .chunk_beam import chunk_beam_search
from .config import WIDTH, GenerateConfig
from .hypothesis import Hypothesis
from .lm import Compute, Lockstep
from .mcts import mcts
from .sampling import Samples, sample

Prompts = Sequence[Sequence[int]]


@dataclass
class Job:
    """What one batch of a search runs with. `ref` is None for a reference-free run; `base` is the model
    chunk-beam and guided decode from (the reference when not given)."""

    policy: torch.nn.Module
    cfg: GenerateConfig
    eos_ids: Sequence[int]
    pad_id: int
    ref: torch.nn.Module | None = None
    base: torch.nn.Module | None = None
    tokenizer: object | None = None
    scorer: Callable | None = None
    generator: torch.Generator | None = None
    compute: Compute = field(default_factory=Compute)

    def lock(self, *models) -> Lockstep:
        return Lockstep([m for m in models if m is not None], self.compute, room=self.cfg.max_new_tokens)

    def sample(self, lock: Lockstep, prompts: Prompts, **kw) -> Samples:
        c = self.cfg
        return sample(lock, prompts, self.pad_id, self.eos_ids, c.max_new_tokens, temperature=c.temperature,
                      top_k=c.top_k, top_p=c.top_p, generator=self.generator, **kw)


def _summed(s: Samples, i: int, first: int = 0) -> dict[str, float | None]:
    """logp / ref_logp of sample row i from the per-token log-probs the lockstep's models [first:] recorded."""
    sums = [float(x[i].sum()) for x in s.logps[first:first + 2]]
    return {"logp": sums[0], "ref_logp": sums[1] if len(sums) > 1 else None}


# --- greedy and sample: the reference scores each token as it is drawn, so no second pass --------------------

def run_sample(job: Job, prompts: Prompts) -> list[Hypothesis]:
    s = job.sample(job.lock(job.policy, job.ref), prompts, greedy=job.cfg.method == "greedy")
    return [Hypothesis(t, float(s.logps[0][i].sum()), **_summed(s, i)) for i, t in enumerate(s.tokens)]


def cost_sample(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    return (1 + with_ref) * (P + cfg.max_new_tokens - 1), 0.0


# --- beam (Eq. 13: likelihood search) and reward-beam (the implicit reward, + beta log pi_ref with --ref-term) --

def run_beam(job: Job, prompts: Prompts) -> list[Hypothesis]:
    c = job.cfg
    if c.method == "beam":
        models, score, monotone = [job.policy], likelihood_score, True
    else:
        def score(logps, b=c.beta, with_ref=c.ref_term):
            return token_rewards(logps[0], logps[1], b, with_ref)

        models, monotone = [job.policy, job.ref], False
    found = beam_search(job.lock(*models), prompts, job.pad_id, job.eos_ids, c.num_beams, c.max_new_tokens, score,
                        c.length_penalty, c.early_stopping.hf, monotone=monotone)
    return [h[0] if h else Hypothesis([], float("-inf"), logp=0.0) for h in found]


def cost_beam(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    return P + with_ref * (P + cfg.max_new_tokens), cfg.max_new_tokens - 1  # the reference rescores (counted)


def cost_reward_beam(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    return 2 * P, 2 * (cfg.max_new_tokens - 1)


def beam_rows(cfg: GenerateConfig) -> int:
    return 2 * cfg.num_beams  # the reorder keeps a second buffer


# --- best-of-n: N samples per prompt, the best by likelihood, implicit reward, step reward or a scorer ---------

def run_best_of_n(job: Job, prompts: Prompts) -> list[Hypothesis]:
    c, N = job.cfg, job.cfg.num_samples
    s = job.sample(job.lock(job.policy, job.ref), prompts, repeat=N)
    contexts = [p for p in prompts for _ in range(N)]
    if c.ranking == "external":
        ptext = [job.tokenizer.decode(p) for p in contexts]
        ctext = [job.tokenizer.decode(t, skip_special_tokens=True) for t in s.tokens]
        scores = checked_scores(job.scorer(ptext, ctext), len(ctext), c.scorer)
    else:
        scores = sample_scores(s.tokens, s.logps[0], s.logps[1] if job.ref is not None else None, c.beta,
                               c.ranking, job.tokenizer, c.delimiter, contexts)
    best = (scores.view(len(prompts), N).argmax(-1) + torch.arange(len(prompts)) * N).tolist()
    return [Hypothesis(s.tokens[i], float(scores[i]), **_summed(s, i)) for i in best]


def cost_best_of_n(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    return (1 + with_ref) * P, (1 + with_ref) * (cfg.max_new_tokens - 1)


# --- guided (Eq. 14 at every token: pi_base * (pi / pi_ref)**alpha); the three caches advance together ---------

def run_guided(job: Job, prompts: Prompts) -> list[Hypothesis]:
    c = job.cfg

    def steer(logps, a=c.alpha):
        return guided_logps(logps[0], logps[1], logps[2], a)

    lock = job.lock(job.base if job.base is not None else job.ref, job.policy, job.ref)
    s = job.sample(lock, prompts, greedy=not c.do_sample, proposal=steer)
    # score: the log-probability of y under the steered distribution it was decoded from
    return [Hypothesis(t, float(s.drawn_from[i].sum()), **_summed(s, i, first=1)) for i, t in enumerate(s.tokens)]


def cost_three_models(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    return 3 * (P + cfg.max_new_tokens - 1), 0.0


# --- chunk-beam (weak-to-strong): the base proposes chunks, the tuned/untuned pair's reward keeps the best ----

def run_chunk_beam(job: Job, prompts: Prompts) -> list[Hypothesis]:
    c = job.cfg
    lock = job.lock(job.base if job.base is not None else job.ref, job.policy, job.ref)
    return chunk_beam_search(lock, prompts, job.pad_id, job.eos_ids, c.num_beams, c.num_samples, c.chunk_len,
                             c.max_new_tokens, c.beta, c.temperature, c.top_k, c.top_p, job.generator)


def cost_chunk_beam(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    return 3 * P, 3 * cfg.num_samples * (cfg.max_new_tokens - 1)


# --- mcts: the tree keeps values, not each path's log-probs, so `generate` rescores its answers (counted) -------

def run_mcts(job: Job, prompts: Prompts) -> list[Hypothesis]:
    c = job.cfg
    return mcts(job.lock(job.policy, job.ref), prompts, job.pad_id, job.eos_ids, c.max_new_tokens, c.beta,
                c.simulations, c.c_puct, c.expand_top_k, c.ref_term or job.ref is None, c.rollout, c.backup,
                c.rollout_len, c.sims_per_call)


def cost_mcts(cfg: GenerateConfig, P: float, with_ref: bool) -> tuple[float, float]:
    M, L = 1 + with_ref, cfg.max_new_tokens
    per_sim = 1 + (min(cfg.rollout_len, L - 1) - 1 if cfg.rollout_len else L - 2) if cfg.rollout else 1
    # prefill, finishing an incomplete answer greedily, rescoring the answer; per simulation
    return M * P + M * (L - 1) + M * (P + L), M * max(per_sim, 1)


def one_row(cfg: GenerateConfig) -> int:
    return 1


@dataclass(frozen=True)
class Method:
    """A decoding method: its run, its cost model (a, b) and its decoding rows per prompt. max_width is the
    widest search of its kind r2q runs (0: no width): beyond it, time or memory (rows of cache and logits) grows
    past any use, and --budget asking for more is refused with the budget that fits."""

    run: Callable[[Job, Prompts], list[Hypothesis]]
    cost: Callable[[GenerateConfig, float, bool], tuple[float, float]]
    rows: Callable[[GenerateConfig], int] = one_row
    max_width: int = 0


REGISTRY: dict[str, Method] = {
    "greedy": Method(run_sample, cost_sample),
    "sample": Method(run_sample, cost_sample),
    "beam": Method(run_beam, cost_beam, beam_rows, max_width=1024),
    "reward-beam": Method(run_beam, cost_reward_beam, beam_rows, max_width=1024),
    "best-of-n": Method(run_best_of_n, cost_best_of_n, lambda cfg: cfg.num_samples, max_width=4096),
    "guided": Method(run_guided, cost_three_models),
    "chunk-beam": Method(run_chunk_beam, cost_chunk_beam, lambda cfg: cfg.num_beams * cfg.num_samples,
                         max_width=1024),
    "mcts": Method(run_mcts, cost_mcts, max_width=4096),
}
MAX_WIDTH = {name: m.max_width for name, m in REGISTRY.items() if m.max_width}
assert set(MAX_WIDTH) == set(WIDTH)
