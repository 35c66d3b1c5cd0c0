"""Per-seed stages that train: preference pairs sampled from the SFT policy and labelled by gold, and the DPO runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import list_checkpoints
from ..models import load_model, load_tokenizer
from ..search import GenerateConfig, generate
from ..tasks.imdb_sentiment import extreme_pairs, load_gold, rt_preference_rows
from ..train import TrainConfig, train
from .common import percentiles, read_jsonl, write_jsonl


def _widest(rows: list[dict], n: int, seed: int) -> list[dict]:
    """The n pairs whose gold rewards lie furthest apart (they carry the preference signal), in a seeded random
    order, so that the first ones can be held out."""
    rows = sorted(rows, key=lambda r: -abs(r["gold_chosen"] - r["gold_rejected"]))[:n]
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    """The null's pairs: each pair's label flipped with probability 1/2."""
    flip = np.random.default_rng(seed).random(len(rows)) < 0.5
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"], chosen_eos=r["rejected_eos"],
                 rejected_eos=r["chosen_eos"], gold_chosen=r["gold_rejected"], gold_rejected=r["gold_chosen"])
            if f else r for r, f in zip(rows, flip)]


def stage_pairs(ctx, d: Path) -> dict[str, Any]:
    """K temperature-1 samples per prompt from the SFT policy; the best and the worst by gold make a pair, labelled
    by Bradley-Terry on gold; the widest-gap pairs are kept. Off-distribution pairs: human Rotten Tomatoes
    snippets under one shared prompt (BOS). Both with a shuffled-label copy of the training pairs (the null)."""
    p, seed, sft = ctx.profile, ctx.seed, ctx.dir("sft") / "model"
    tok = load_tokenizer(sft)
    prompts = [r["prompt"] for r in read_jsonl(ctx.dir("data") / "pair_prompts.jsonl")]
    K = p.pair_samples
    cfg = GenerateConfig(method="sample", max_new_tokens=p.pair_tokens, seed=seed, batch_size=256)
    gens, compute = generate(load_model(sft), tok, [x for x in prompts for _ in range(K)], cfg)
    gold = load_gold(ctx.dir("gold") / "gold.json")
    texts = [g.text for g in gens]
    ended = [bool(g.token_ids) and g.token_ids[-1] == tok.eos_token_id for g in gens]
    scores = gold(texts)
    rows = _widest(extreme_pairs(prompts, texts, ended, scores, K, seed=seed), p.n_pairs + p.n_eval_pairs, seed)
    write_jsonl(d / "eval.jsonl", rows[: p.n_eval_pairs])
    write_jsonl(d / "train.jsonl", rows[p.n_eval_pairs :])
    write_jsonl(d / "train-shuffled.jsonl", _shuffled(rows[p.n_eval_pairs :], seed + 1))
    rt = rt_preference_rows(read_jsonl(ctx.dir("data") / "rt_snippets.jsonl"), gold, prompt=tok.bos_token, seed=seed)
    rt = _widest(rt, p.n_rt_pairs + p.n_rt_eval, seed + 2)
    write_jsonl(d / "rt-eval.jsonl", rt[: p.n_rt_eval])
    write_jsonl(d / "rt-train.jsonl", rt[p.n_rt_eval :])
    write_jsonl(d / "rt-train-shuffled.jsonl", _shuffled(rt[p.n_rt_eval :], seed + 3))
    return {"samples": len(gens), "samples_ending_in_eos": float(np.mean(ended)),
            "sample_tokens": percentiles([len(g.token_ids) for g in gens]), "sample_gold_mean": float(scores.mean()),
            "train_pairs": len(rows) - p.n_eval_pairs, "eval_pairs": p.n_eval_pairs,
            "label_agrees_with_gold": float(np.mean([r["gold_chosen"] > r["gold_rejected"] for r in rows])),
            "rt_pairs": len(rt), "rt_label_agrees_with_gold":
                float(np.mean([r["gold_chosen"] > r["gold_rejected"] for r in rt])), **compute}


@dataclass(frozen=True)
class RunSpec:
    """One DPO run of the plan."""

    name: str
    sft_on_chosen: bool  # the paper's reference choice (a): the reference is SFT-trained on the chosen side first
    train_file: str
    eval_file: str
    beta: float
    rt: bool  # on the off-distribution Rotten Tomatoes pairs


@dataclass
class DPORun:
    """What a DPO stage made: its model, its reference, its settings and its final held-out metrics."""

    name: str
    model: str
    reference: str
    beta: float
    lr: float
    epochs: float
    steps: int
    train_file: str
    eval_file: str
    rt: bool
    eval_loss: float
    eval_accuracy: float
    eval_margin: float


def dpo_plan(p) -> dict[str, RunSpec]:
    """Every DPO run: (a) from SFT on chosen, (b) from SFT, the shuffled-label null of (b), each on the sampled pairs
    and on Rotten Tomatoes (-rt), and (b) at every other beta."""
    b0 = p.betas[0]
    on, rt = ("train.jsonl", "eval.jsonl"), ("rt-train.jsonl", "rt-eval.jsonl")
    specs = [RunSpec("dpo-a", True, *on, b0, False), RunSpec("dpo-b", False, *on, b0, False),
             RunSpec("dpo-shuffled", False, "train-shuffled.jsonl", on[1], b0, False),
             RunSpec("dpo-a-rt", True, *rt, b0, True), RunSpec("dpo-b-rt", False, *rt, b0, True),
             RunSpec("dpo-shuffled-rt", False, "rt-train-shuffled.jsonl", rt[1], b0, True)]
    specs += [RunSpec(f"dpo-b-beta{b:g}", False, *on, b, False) for b in p.betas[1:]]
    return {s.name: s for s in specs}


def stage_dpo(ctx, d: Path, spec: RunSpec) -> dict[str, Any]:
    p, pairs, sft = ctx.profile, ctx.dir("pairs"), ctx.dir("sft") / "model"
    tokens = p.rt_tokens if spec.rt else p.pair_tokens
    tr, ev = str(pairs / spec.train_file), str(pairs / spec.eval_file)
    # a stage that runs again starts over (an interrupted attempt may have left a partial run in its dir)
    common = dict(batch_size=p.dpo_batch, max_length=p.max_len(tokens), max_prompt_length=2 * p.prompt_tokens,
                  seed=ctx.seed, quiet=ctx.quiet, overwrite=True)
    start = sft
    if spec.sft_on_chosen:
        train(TrainConfig(model=str(sft), data=tr, out=str(d / "sft-chosen"), lr=p.sft_lr / 3,
                          max_steps=p.chosen_sft_steps, schedule="constant", **common), mode="sft")
        start = d / "sft-chosen"
    lr = p.dpo_lr(spec.beta)
    cfg = TrainConfig(model=str(start), data=tr, eval_data=ev, out=str(d / "model"), ref="init", beta=spec.beta,
                      lr=lr, warmup_steps=p.dpo_warmup, epochs=1.0, eval_every=p.eval_every, eval_on_start=True,
                      save_every=p.eval_every, keep_last=1000, precompute_ref=True, cache_dir=str(d / "ref-cache"),
                      **common)
    res = train(cfg, mode="dpo")
    for ck in list_checkpoints(d / "model"):  # weight snapshots for the dynamics; the demo never resumes them
        (ck / "optimizer.safetensors").unlink(missing_ok=True)
    last = [m for m in res.metrics if m["split"] == "eval"][-1]
    return asdict(DPORun(spec.name, str(d / "model"), str(start), spec.beta, lr, 1.0, res.steps, tr, ev, spec.rt,
                         last["loss"], last["rewards/accuracies"], last["rewards/margins"]))
