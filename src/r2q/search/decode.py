"""`generate`: prompts in, one hypothesis per prompt out, with the compute spent, for every method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import flag
from ..errors import UserError
from ..models import pad_id
from ..progress import progress_bar
from ..rewards import guided_logps, likelihood_score, sequence_rewards, token_rewards
from ..tokens import build_batch, completion_logps
from .beam import beam_search
from .bon import checked_scores, load_external_scorer, sample_scores
from .chunk_beam import chunk_beam_search
from .config import WIDTH, GenerateConfig, check_models
from .lm import Compute, Lockstep, free_memory, kv_bytes_per_token, vocab_of
from .mcts import mcts
from .sampling import sample


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    logp: float  # log pi(y|x), summed over tokens
    reward: float | None  # beta * log pi(y|x)/pi_ref(y|x), when a reference is given
    score: float  # what the method ranked by
    num_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def cost_per_prompt(cfg: GenerateConfig, prompt_len: float, with_ref: bool) -> tuple[float, float]:
    """(a, b): a prompt of prompt_len tokens costs at most a + b * width tokens processed (every model's forward
    positions, as `Compute` counts them, rescoring included), reached when no output ends before
    --max-new-tokens. Width is WIDTH[cfg.method]; b = 0 for methods without one."""
    P, L, M = prompt_len, cfg.max_new_tokens, 1 + with_ref
    m = cfg.method
    if m in ("greedy", "sample"):
        return M * (P + L - 1), 0.0
    if m == "guided":
        return 3 * (P + L - 1), 0.0
    if m == "best-of-n":
        return M * P, M * (L - 1)
    if m == "beam":  # the reference scores the outputs afterwards (one counted pass)
        return P + with_ref * (P + L), L - 1
    if m == "reward-beam":
        return 2 * P, 2 * (L - 1)
    if m == "chunk-beam":
        return 3 * P, 3 * cfg.num_samples * (L - 1)
    per_sim = 1 + (min(cfg.rollout_len, L - 1) - 1 if cfg.rollout_len else L - 2) if cfg.rollout else 1
    # prefill, finishing an incomplete answer greedily, rescoring the answer; per simulation
    return M * P + M * (L - 1) + M * (P + L), M * max(per_sim, 1)


# the widest search of each kind r2q runs: beyond it, time (MCTS simulations run one after another) or memory (rows
# of cache and logits) grows past any use; --budget asking for more is refused with the budget that fits
MAX_WIDTH = {"best-of-n": 4096, "beam": 1024, "reward-beam": 1024, "chunk-beam": 1024, "mcts": 4096}


def with_budget(cfg: GenerateConfig, prompt_len: float, with_ref: bool) -> GenerateConfig:
    """cfg with its width (WIDTH) set to the largest whose worst-case cost per prompt fits cfg.budget."""
    a, b = cost_per_prompt(cfg, prompt_len, with_ref)
    width = int((cfg.budget - a) // b) if b else 0
    if width < 1:
        raise UserError(f"--budget {cfg.budget} is below the cost of the narrowest {cfg.method} "
                        f"({a + b:.0f} tokens per prompt here)")
    top = MAX_WIDTH[cfg.method]
    if width > top:
        raise UserError(f"--budget {cfg.budget:,} would set {cfg.method}'s {flag(WIDTH[cfg.method])} to {width:,}; "
                        f"r2q runs at most {top:,}, which a budget of {a + b * top:,.0f} tokens per prompt buys here")
    return replace(cfg, **{WIDTH[cfg.method]: width})


def decoding_rows(cfg: GenerateConfig, prompts: int) -> int:
    """Rows decoded side by side for `prompts` prompts (each row holds a KV cache and next-token log-probs)."""
    m = cfg.method
    per = {"best-of-n": cfg.num_samples, "beam": 2 * cfg.num_beams, "reward-beam": 2 * cfg.num_beams,
           "chunk-beam": cfg.num_beams * cfg.num_samples}.get(m, 1)  # beams: the reorder keeps a second buffer
    return prompts * per


def check_memory(cfg: GenerateConfig, models: Sequence, prompt_len: int, prompts: int) -> None:
    """Refuse, before anything is allocated, a search whose caches and logits would not fit in the memory free on
    the device: one line with the estimate and what to lower."""
    free = free_memory(next(models[0].parameters()).device)
    if free is None:
        return
    positions = prompt_len + cfg.max_new_tokens
    per_row = sum(kv_bytes_per_token(m) * positions + 4 * 4 * vocab_of(m) for m in models)
    need = decoding_rows(cfg, min(prompts, cfg.batch_size)) * per_row
    if need > 0.9 * free:
        width = f" with {flag(WIDTH[cfg.method])} {getattr(cfg, WIDTH[cfg.method])}" if cfg.method in WIDTH else ""
        raise UserError(f"--method {cfg.method}{width} and --batch-size {cfg.batch_size} would need about "
                        f"{need / 1e9:.1f} GB for caches and logits; {free / 1e9:.1f} GB are free: lower the width, "
                        "--budget or --batch-size")


Decoded = tuple[list[int], float, list[float | None]]  # tokens, score, [log pi(y|x), log pi_ref(y|x) or None]


@torch.no_grad()
def generate_ids(policy, prompts: Sequence[Sequence[int]], cfg: GenerateConfig, eos_ids: Sequence[int], pad_id: int,
                 ref=None, base=None, tokenizer=None, scorer=None,
                 generator: torch.Generator | None = None) -> tuple[list[Decoded], Compute]:
    """One batch: (tokens, score, [log pi(y|x), log pi_ref(y|x)]) per prompt and the compute the search spent.
    The log-probs are the ones the search computed on the way (None where it did not run that model)."""
    m = cfg.method
    compute = Compute()
    with_ref = [policy] + ([ref] if ref is not None else [])

    def lps(sums: Sequence[float]) -> list[float | None]:  # [policy, reference]; None for a model not run
        got: list[float | None] = [float(x) for x in sums[:2]]
        return got + [None] * (2 - len(got))

    if m in ("greedy", "sample"):  # the reference scores each token as it is drawn: no second pass
        s = sample(Lockstep(with_ref, compute), prompts, pad_id, eos_ids, cfg.max_new_tokens, greedy=m == "greedy",
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
        out = [(t, float(s.logps[0][i].sum()), lps([x[i].sum() for x in s.logps]))
               for i, t in enumerate(s.tokens)]
    elif m in ("beam", "reward-beam"):
        if m == "beam":
            models, fn, mono = [policy], likelihood_score, True
        else:
            def fn(logps, b=cfg.beta, with_ref=cfg.ref_term):
                return token_rewards(logps[0], logps[1], b, with_ref)

            models, mono = [policy, ref], False
        hyps = beam_search(Lockstep(models, compute), prompts, pad_id, eos_ids, cfg.num_beams, cfg.max_new_tokens,
                           fn, cfg.length_penalty, cfg.early_stopping.hf, monotone=mono, model_logps=True)
        out = [(h[0][0], h[0][1], lps(h[0][2])) if h else ([], float("-inf"), [0.0, None])
               for h in hyps]
    elif m == "best-of-n":
        N = cfg.num_samples
        s = sample(Lockstep(with_ref, compute), prompts, pad_id, eos_ids, cfg.max_new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, repeat=N)
        if cfg.ranking == "external":
            ptext = [tokenizer.decode(p) for p in prompts for _ in range(N)]
            ctext = [tokenizer.decode(t, skip_special_tokens=True) for t in s.tokens]
            scores = checked_scores(scorer(ptext, ctext), len(ctext), cfg.scorer)
        else:
            scores = sample_scores(s.tokens, s.logps[0], s.logps[1] if ref is not None else None, cfg.beta,
                                   cfg.ranking, tokenizer, cfg.delimiter, [p for p in prompts for _ in range(N)])
        best = (scores.view(len(prompts), N).argmax(-1) + torch.arange(len(prompts)) * N).tolist()
        out = [(s.tokens[i], float(scores[i]), lps([x[i].sum() for x in s.logps])) for i in best]
    elif m == "guided":  # Eq. 14 at every token; the three caches advance together
        def steer(logps, a=cfg.alpha):
            return guided_logps(logps[0], logps[1], logps[2], a)

        lock = Lockstep([base if base is not None else ref, policy, ref], compute)
        s = sample(lock, prompts, pad_id, eos_ids, cfg.max_new_tokens, greedy=not cfg.do_sample,
                   temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, proposal=steer)
        out = [(t, float(s.drawn_from[i].sum()), lps([x[i].sum() for x in s.logps[1:]]))
               for i, t in enumerate(s.tokens)]  # score: log of the steered distribution's probability of y
    elif m == "chunk-beam":
        lock = Lockstep([base if base is not None else ref, policy, ref], compute)
        out = [(t, sc, lps(lp)) for t, sc, lp in chunk_beam_search(
            lock, prompts, pad_id, eos_ids, cfg.num_beams, cfg.num_samples, cfg.chunk_len, cfg.max_new_tokens,
            cfg.beta, cfg.temperature, cfg.top_k, cfg.top_p, generator)]
    else:  # the tree keeps values, not each path's log-probs: generate rescores MCTS's outputs (counted)
        out = [(t, sc, [None, None]) for t, sc in mcts(
            Lockstep(with_ref, compute), prompts, pad_id, eos_ids, cfg.max_new_tokens, cfg.beta, cfg.simulations,
            cfg.c_puct, cfg.expand_top_k, cfg.ref_term or ref is None, cfg.rollout, cfg.backup, cfg.rollout_len)]
    return out, compute.stop()


@torch.no_grad()
def sequence_logps(model, prompts, completions, pad_id: int, compute: Compute | None = None) -> list[float]:
    """log p(y|x) of finished outputs under one model, with the training code path (0 for an empty output);
    the forward is counted in `compute` when given."""
    keep = [i for i, c in enumerate(completions) if len(c)]
    out = [0.0] * len(completions)
    if keep:
        b = build_batch([prompts[i] for i in keep], [completions[i] for i in keep], pad_id)
        b = b.to(next(model.parameters()).device)
        s = sequence_rewards(completion_logps(model, b), b.completion_mask()).tolist()
        for j, i in enumerate(keep):
            out[i] = s[j]
        if compute is not None:
            compute.forward_passes += 1
            compute.tokens_processed += sum(len(prompts[i]) + len(completions[i]) for i in keep)
    return out


@torch.no_grad()
def score_sequences(policy, ref, prompts, completions, pad_id: int, beta: float):
    """log pi(y|x) and beta * log pi/pi_ref (None without a reference) of finished outputs, rescored."""
    logp = sequence_logps(policy, prompts, completions, pad_id)
    if ref is None:
        return logp, [None] * len(completions)
    ref_lp = sequence_logps(ref, prompts, completions, pad_id)
    return logp, [token_rewards(a, b, beta) for a, b in zip(logp, ref_lp)]


def _complete_logps(out: list[Decoded], prompts, policy, ref, pad: int, compute: Compute):
    """log pi(y|x) and log pi_ref(y|x) of each output: carried from the search where it ran the model, else one
    rescoring forward over the outputs, added to the compute."""
    toks = [t for t, _, _ in out]
    logp = [lp[0] for _, _, lp in out]
    if any(x is None for x in logp):
        logp = sequence_logps(policy, prompts, toks, pad, compute)
    ref_lp = [lp[1] for _, _, lp in out]
    if ref is not None and any(x is None for x in ref_lp):
        ref_lp = sequence_logps(ref, prompts, toks, pad, compute)
    return logp, ref_lp


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids as decoding starts from them; an empty prompt is BOS alone."""
    enc = [tokenizer(p).input_ids or ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
           for p in prompts]
    if any(not e for e in enc):
        raise UserError("an empty prompt cannot be decoded from with a tokenizer that has no BOS token")
    return enc


def generate(policy, tokenizer, prompts: Sequence[str], cfg: GenerateConfig, ref=None, base=None,
             progress: bool = False) -> tuple[list[Generation], dict[str, float]]:
    """Decode every prompt with cfg.method; returns one Generation per prompt and the total compute."""
    check_models(cfg, ref, base)
    for m in (policy, ref, base):
        if m is not None:
            m.eval()
    scorer = load_external_scorer(cfg.scorer) if cfg.method == "best-of-n" and cfg.ranking == "external" else None
    eos_ids = [tokenizer.eos_token_id]
    pad = pad_id(tokenizer)
    enc = encode_prompts(tokenizer, prompts)
    if cfg.budget:
        cfg = with_budget(cfg, sum(map(len, enc)) / len(enc), ref is not None)
    check_memory(cfg, [m for m in (policy, ref, base) if m is not None], max(map(len, enc)), len(enc))
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    total: dict[str, float] = {"forward_passes": 0, "tokens_processed": 0, "wall_time_s": 0.0}
    results: list[Generation] = []
    with progress_bar(progress) as bar:
        task = bar.add_task(cfg.method, total=len(prompts), info="")
        for i in range(0, len(prompts), cfg.batch_size):
            chunk = enc[i : i + cfg.batch_size]
            out, compute = generate_ids(policy, chunk, cfg, eos_ids, pad, ref, base, tokenizer, scorer, g)
            logp, ref_lp = _complete_logps(out, chunk, policy, ref, pad, compute)
            for k, v in compute.as_dict().items():
                total[k] += v
            share = {f"compute_{k}": v / len(chunk) for k, v in compute.as_dict().items()}
            for j, (t, sc, _) in enumerate(out):
                reward = token_rewards(logp[j], ref_lp[j], cfg.beta) if ref is not None else None
                results.append(Generation(prompts[i + j], tokenizer.decode(t, skip_special_tokens=True), t,
                                          logp[j], reward, sc, len(t), share))
            bar.update(task, advance=len(chunk))
    if cfg.budget:
        total["width"] = getattr(cfg, WIDTH[cfg.method])
    return results, total
