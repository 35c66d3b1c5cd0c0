"""Finding 3, per seed: implicit rewards during training, and how far each run moved from its reference.

For every DPO run: its held-out pairs scored at the end (loss, accuracy, rewards with intervals over pairs); the
pre-update training-batch rewards of the last quarter of training from the trainer's log (one point per step, each
measured before its update); the held-out curve the trainer logged; and E_{y~pi_ref}[beta log pi/pi_ref] =
-beta KL(pi_ref||pi) from reference samples. For the runs of finding 3 (CURVES) also the held-out rewards at every
checkpoint of the last quarter (per pair, averaged over those checkpoints) and the KL at every checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import list_checkpoints
from ..credit import score_pairs
from ..models import load_model, load_tokenizer
from ..rewards import expected_reward, kl_ref_pi, token_rewards
from ..search import GenerateConfig, encode_prompts, generate, score_sequences
from ..stats import mean_ci
from .common import read_jsonl

# the runs of finding 3: a KL curve over every checkpoint and held-out rewards over the last quarter of training
# (the others, nulls and other betas: at the end only)
CURVES = ("dpo-a", "dpo-b", "dpo-a-rt", "dpo-b-rt")


def _checkpoints(model_dir: Path) -> list[tuple[int, Path]]:
    return [(int(c.name.split("-")[1]), c) for c in list_checkpoints(model_dir)]


def _pair_values(policy, ref, tok, rows: list[dict], beta: float, max_length: int, max_prompt: int
                 ) -> dict[str, np.ndarray]:
    rep = score_pairs(policy, ref, tok, rows, beta, max_length=max_length, max_prompt_length=max_prompt,
                      delimiter=None, use_cache=False)
    P = rep.pairs
    return {"loss": np.array([x.loss for x in P]), "correct": np.array([float(x.correct) for x in P]),
            "chosen": np.array([x.chosen.reward for x in P]), "rejected": np.array([x.rejected.reward for x in P]),
            "margin": np.array([x.margin for x in P])}


def _kl(policy, ref_samples, beta: float) -> dict[str, float]:
    """E_{y~pi_ref}[beta log pi/pi_ref] (= -beta KL(pi_ref||pi)) from reference samples, with its standard error
    and KL itself in nats per sample."""
    enc, toks, ref_lp, eos = ref_samples
    lp = np.array(score_sequences(policy, None, enc, toks, eos, beta)[0])
    r = torch.as_tensor(token_rewards(lp, ref_lp, beta), dtype=torch.float64)  # R(y) of each reference sample
    return {"expected_reward_under_ref": float(expected_reward(r)), "stderr": float(r.std(unbiased=False) /
            math.sqrt(len(r))), "kl_nats": float(kl_ref_pi(r, beta))}


def _one_run(ctx, run, tok) -> dict[str, Any]:
    p = ctx.profile
    tokens = p.rt_tokens if run.rt else p.pair_tokens
    kw = dict(max_length=p.max_len(tokens), max_prompt=2 * p.prompt_tokens)
    rows = read_jsonl(Path(run.eval_file))
    ref = load_model(run.reference).eval()
    prompts = [r["prompt"] for r in rows][: p.n_ref_samples]
    cfg = GenerateConfig(method="sample", max_new_tokens=tokens, seed=ctx.seed, batch_size=256)
    samples, _ = generate(ref, tok, prompts, cfg)
    ref_samples = (encode_prompts(tok, prompts), [g.token_ids for g in samples], np.array([g.logp for g in samples]),
                   tok.eos_token_id)
    points = _checkpoints(Path(run.model))
    total = run.steps
    late = [(s, c) for s, c in points if s >= 0.75 * total and s != total and run.name in CURVES]
    late.append((total, Path(run.model)))
    per_pair = {s: _pair_values(load_model(c).eval(), ref, tok, rows, run.beta, **kw) for s, c in late}
    final = per_pair[total]
    nb = p.n_boot
    out: dict[str, Any] = {
        "final": {k: mean_ci(v, nb) for k, v in final.items()},
        "last_quarter_steps": [s for s, _ in late],
        "last_quarter": {k: mean_ci(np.mean([per_pair[s][k] for s, _ in late], axis=0), nb)
                         for k in ("chosen", "rejected", "margin")},
        "last_quarter_chosen_per_pair": np.mean([per_pair[s]["chosen"] for s, _ in late], axis=0).round(6).tolist(),
    }
    metrics = read_jsonl(Path(run.model) / "metrics.jsonl")
    train = [m for m in metrics if m["split"] == "train"]
    out["train"], out["eval"] = train, [m for m in metrics if m["split"] == "eval"]
    late_train = [m for m in train if m["step"] > 0.75 * total]
    names = {"chosen": "rewards/chosen", "rejected": "rewards/rejected", "margin": "rewards/margins"}
    out["last_quarter_train"] = {k: mean_ci([m[name] for m in late_train], nb) for k, name in names.items()}
    # step 0: the starting policy is the reference's weights, scored like every checkpoint (not assumed)
    curve = [(0, Path(run.reference))] + (points if run.name in CURVES else []) + [(total, Path(run.model))]
    out["kl_curve"] = [{"step": s, **_kl(ref if s == 0 else load_model(c).eval(), ref_samples, run.beta)}
                       for s, c in dict(curve).items()]
    out["kl_nats_final"] = out["kl_curve"][-1]["kl_nats"]
    return out


def stage_dynamics(ctx, d: Path) -> dict[str, Any]:
    runs = ctx.runs()
    tok = load_tokenizer(ctx.dir("sft") / "model")
    out: dict[str, Any] = {"runs": {name: _one_run(ctx, run, tok) for name, run in runs.items()}}
    a, b = out["runs"]["dpo-a-rt"], out["runs"]["dpo-b-rt"]
    diff = np.array(b["last_quarter_chosen_per_pair"]) - np.array(a["last_quarter_chosen_per_pair"])
    out["rt_chosen_b_minus_a"] = mean_ci(diff, ctx.profile.n_boot)  # the same held-out pairs, paired
    return out
