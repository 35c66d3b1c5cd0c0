"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task, end to end, from scratch.

Stages (each cached under DIR/<stage>/ with the settings that made it; a second run reuses them):
  data      IMDb reviews split into gold / search / LM text; a byte-level BPE tokenizer; Rotten Tomatoes snippets
  gold      the gold reward: TF-IDF + logistic regression on the gold reviews
  judge     a fluency judge: an LM like the policy's, trained on the gold reviews (never on the policy's text)
  sft       the SFT policy: a small Llama-style LM on review text, EOS only where a review really ends
  pairs     K samples per prompt (prompts: starts of gold reviews) from the SFT policy; the best and the worst by
            gold make a pair, labelled by Bradley-Terry on gold; a sample cut at the length cap carries no EOS.
            Also off-distribution pairs: human Rotten Tomatoes snippets under one shared (empty) prompt.
  dpo-*     a: SFT on the chosen side, then DPO with it as reference; b: DPO from the SFT policy (the main policy);
            shuffled: b on shuffled labels (a null); a-rt / b-rt: a and b on the Rotten Tomatoes pairs
  credit    per-token rewards against gold word weights (with nulls and intervals), the edit test, held-out pairs
  search    sampling, greedy, beam K at length penalty 0 and 1, reward-beam, best-of-N, guided, MCTS on DPO (b);
            and every searching method at equal compute (tokens processed per prompt: `budgets`)
  dynamics  implicit rewards along training, and E_{y~pi_ref}[beta log pi/pi_ref] = -beta KL(pi_ref||pi)
Then DIR/summary.json (with the computed `claims`), DIR/report.html and the key tables in the terminal.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import check_options, option
from ..errors import UserError
from ..models import load_model, load_tokenizer, save_model, tiny_model, train_bpe_tokenizer
from ..paths import check_out_dir
from ..search import GenerateConfig, generate
from ..tasks.imdb_sentiment import (
    GoldReward,
    extreme_pairs,
    load_gold,
    load_reviews,
    rt_pairs,
    rt_preference_rows,
    save_gold,
    split_reviews,
)
from ..train import TrainConfig, train
from . import findings
from .common import jsonable, max_len, read_jsonl, write_jsonl
from .report import key_tables, write_report

PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(
        n_gold=8000, n_lm_reviews=12000, vocab=4096, hidden=128, layers=4, heads=4, lm_len=64, sft_steps=700,
        sft_batch=32, sft_lr=3e-3, judge_layers=2, judge_steps=300, prompt_tokens=8, pair_samples=4,
        pair_tokens=48, n_pairs=2048, n_eval_pairs=256, n_rt_pairs=1024, n_rt_eval=256, rt_candidates=4200,
        rt_epochs=2, rt_tokens=64, chosen_sft_steps=60, dpo_epochs=1, dpo_batch=16, dpo_lr=1e-3, dpo_warmup=10,
        betas=(0.1,), eval_every=16, n_search=128, search_tokens=64, beams=(2, 4, 8, 16), length_penalties=(0.0, 1.0),
        bon_n=4, mcts_sims=8, n_ref_samples=256, edit_words=12, n_boot=1000, budgets=(500, 1000, 2000),
        guided_alphas=(2.0, 4.0),
    ),
}
# a step up from quick: 2.4x the compute per token, 1.4x the LM text, 1.5x the pairs, three betas and more widths
# (measured: README, "full profile")
PROFILES["full"] = dict(PROFILES["quick"], n_lm_reviews=16500, vocab=8192, hidden=160, layers=6, heads=4, lm_len=96,
                        sft_steps=1500, sft_lr=2e-3, judge_layers=3, judge_steps=400, pair_tokens=64, n_pairs=3000,
                        n_eval_pairs=512, chosen_sft_steps=100, dpo_warmup=20, betas=(0.1, 0.05, 0.5),
                        beams=(2, 3, 4, 6, 8, 16), bon_n=8, mcts_sims=16, edit_words=16)
# for the pipeline test: every stage, at a size that runs in about a minute
PROFILES["tiny"] = dict(PROFILES["quick"], n_gold=2000, n_lm_reviews=3000, vocab=1024, hidden=64, layers=2,
                        lm_len=48, sft_steps=200, judge_layers=1, judge_steps=60, pair_samples=2, pair_tokens=16,
                        n_pairs=384, n_eval_pairs=64, n_rt_pairs=192, n_rt_eval=64, rt_candidates=600,
                        chosen_sft_steps=10, dpo_lr=3e-3, eval_every=8, n_search=24, search_tokens=20, beams=(2, 4),
                        bon_n=2, mcts_sims=4, n_ref_samples=24, edit_words=8, n_boot=100, budgets=(200, 400, 800),
                        guided_alphas=(2.0,))


@dataclass
class DemoConfig:
    out: str = option("r2q-demo", "Output directory (stages cached here)")
    profile: str = option("quick", "quick (minutes on a laptop CPU) or full (better fidelity)",
                          choices=tuple(PROFILES))
    seed: int = option(0, "Seed of every stage", ge=0)
    quiet: bool = option(False, "No progress bars inside stages")

    def __post_init__(self):
        check_options(self)


class Stages:
    """Run-once stages: DIR/<name>/stage.json records the settings, the stage's small results and the seconds
    the run that computed it took (kept when a later run reuses the stage)."""

    def __init__(self, root: Path, settings: dict[str, Any], console):
        self.root, self.settings, self.console = root, settings, console
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []

    def run(self, name: str, deps: tuple[str, ...], fn) -> dict[str, Any]:
        d = self.root / name
        key = hashlib.sha256(json.dumps([self.settings, name, [self._key(x) for x in deps]], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        marker = d / "stage.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                self.console.print(f"[dim]{name}: cached ({saved['seconds']:.0f}s when it ran)[/]")
                self.timings[name] = saved["seconds"]
                self.reused.append(name)
                return saved["result"]
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.console.rule(f"[bold]{name}")
        result = fn(d)
        dt = time.perf_counter() - t0
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": dt, "result": result}, indent=1, default=jsonable))
        tmp.replace(marker)
        self.timings[name] = dt
        summary = ", ".join(f"{k} {_short(v)}" for k, v in result.items() if isinstance(v, (int, float)))[:300]
        self.console.print(f"[green]{name}[/] done in {dt:.0f}s  {summary}", highlight=False)
        return result

    def _key(self, name: str) -> str:
        m = self.root / name / "stage.json"
        return json.loads(m.read_text())["key"] if m.exists() else ""


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------ stages


def stage_data(d: Path, p: dict, seed: int) -> dict[str, Any]:
    splits = split_reviews(load_reviews("imdb"), p["n_gold"], p["n_search"], seed)
    lm = splits.lm[: p["n_lm_reviews"]]
    tok = train_bpe_tokenizer(lm, vocab_size=p["vocab"], chat_template=None)
    tok.save_pretrained(d / "tokenizer")
    write_jsonl(d / "lm.jsonl", lm_rows(tok, lm, p["lm_len"]))
    write_jsonl(d / "gold.jsonl", [{"text": t, "label": y} for t, y in splits.gold])
    # the judge learns review text it shares with no policy: the gold reviews
    write_jsonl(d / "judge.jsonl", lm_rows(tok, [t for t, _ in splits.gold], p["lm_len"]))
    n_pair_prompts = p["n_pairs"] + p["n_eval_pairs"]
    if n_pair_prompts > len(splits.gold):
        raise UserError(f"profile asks for {n_pair_prompts} pair prompts from {len(splits.gold)} gold reviews")
    # prompts start with BOS, as every review does in the LM rows: without it the LM cannot tell a review's start
    # from the end windows that teach EOS, and it stops within a few tokens
    k, bos = p["prompt_tokens"], tok.bos_token
    pair_prompts = [bos + tok.decode(tok(t).input_ids[:k]) for t, _ in splits.gold[:n_pair_prompts]]
    write_jsonl(d / "pair_prompts.jsonl", [{"prompt": x} for x in pair_prompts])
    search = []
    for t in splits.prompts:  # held-out reviews: the prompt and the human continuation of the same length cap
        ids = tok(t).input_ids
        search.append({"prompt": bos + tok.decode(ids[:k]), "human": tok.decode(ids[k : k + p["search_tokens"]]),
                       "human_eos": len(ids) <= k + p["search_tokens"]})
    write_jsonl(d / "search_prompts.jsonl", search)
    rt = rt_pairs(load_reviews("rotten_tomatoes"), p["rt_candidates"], seed)
    write_jsonl(d / "rt_snippets.jsonl", rt)
    return {"lm_reviews": len(lm), "gold_reviews": len(splits.gold), "pair_prompts": len(pair_prompts),
            "search_prompts": len(search), "rt_snippet_pairs": len(rt), "vocab": len(tok)}


def lm_rows(tok, texts: list[str], lm_len: int) -> list[dict]:
    """LM rows that teach EOS only where a review ends: each review's start (cut at lm_len tokens, so a long
    review's row has no EOS) and, for a long review, its last lm_len - 1 tokens followed by EOS."""
    rows = []
    for t in texts:
        ids = tok(t).input_ids
        rows.append({"text": t, "text_eos": len(ids) < lm_len})
        if len(ids) >= lm_len:
            rows.append({"text": tok.decode(ids[-(lm_len - 2):]).lstrip(), "text_eos": True})
    return rows


def stage_gold(d: Path, data: Path, seed: int) -> dict[str, Any]:
    rows = read_jsonl(data / "gold.jsonl")
    gold = GoldReward([(r["text"], r["label"]) for r in rows], seed=seed)
    save_gold(gold, d / "gold.json")
    return {"test_accuracy": gold.test_accuracy, "features": len(gold.weights)}


def stage_lm(d: Path, data: Path, rows: str, p: dict, seed: int, quiet: bool, layers: int, steps: int) -> dict:
    """A small Llama-style LM trained from scratch on `rows` (`r2q sft` on {"text"} rows), 5% held out."""
    tok = load_tokenizer(data / "tokenizer")
    init = save_model(tiny_model("llama", len(tok), seed=seed, hidden=p["hidden"], layers=layers,
                                 heads=p["heads"], max_positions=256), tok, d / "init")
    cfg = TrainConfig(model=str(init), data=str(data / rows), out=str(d / "model"), lr=p["sft_lr"],
                      schedule="cosine", warmup_steps=max(1, steps // 20), max_steps=steps, eval_fraction=0.05,
                      batch_size=p["sft_batch"], max_length=p["lm_len"], max_prompt_length=8, seed=seed, quiet=quiet,
                      weight_decay=0.01, eval_every=max(1, steps // 5), overwrite=True)
    res = train(cfg, mode="sft")
    tr = [m for m in res.metrics if m["split"] == "train"][-1]
    ev = [m for m in res.metrics if m["split"] == "eval"]
    # the held-out curve sizes the steps: still falling at the end means under-trained, rising means memorised
    return {"params": sum(x.numel() for x in res.model.parameters()), "train_ppl": tr["ppl"],
            "heldout_ppl": ev[-1]["ppl"], "heldout_ppl_curve": [[m["step"], m["ppl"]] for m in ev],
            "heldout_ppl_best_step": min(ev, key=lambda m: m["ppl"])["step"], "steps": res.steps}


def stage_pairs(d: Path, data: Path, sft: Path, gold_path: Path, p: dict, seed: int, quiet: bool) -> dict[str, Any]:
    tok = load_tokenizer(sft)
    prompts = [r["prompt"] for r in read_jsonl(data / "pair_prompts.jsonl")]
    K = p["pair_samples"]
    cfg = GenerateConfig(method="sample", max_new_tokens=p["pair_tokens"], seed=seed, batch_size=64)
    gens, compute = generate(load_model(sft), tok, [x for x in prompts for _ in range(K)], cfg, progress=not quiet)
    gold = load_gold(gold_path)
    texts = [g.text for g in gens]
    ended = [bool(g.token_ids) and g.token_ids[-1] == tok.eos_token_id for g in gens]
    scores = gold(texts)
    rows = extreme_pairs(prompts, texts, ended, scores, K, seed=seed)
    n_eval = p["n_eval_pairs"] * len(rows) // len(prompts)
    write_jsonl(d / "train.jsonl", rows[n_eval:])
    write_jsonl(d / "eval.jsonl", rows[:n_eval])
    shuffled = [dict(r, chosen=r["rejected"], rejected=r["chosen"], chosen_eos=r["rejected_eos"],
                     rejected_eos=r["chosen_eos"]) if flip else r
                for r, flip in zip(rows[n_eval:], np.random.default_rng(seed + 1).random(len(rows)) < 0.5)]
    write_jsonl(d / "train-shuffled.jsonl", shuffled)
    rt = rt_preference_rows(read_jsonl(data / "rt_snippets.jsonl"), gold, prompt=tok.bos_token, seed=seed)
    # as on-distribution, pairs whose gold rewards are far apart carry the signal: keep the widest gaps
    rt = sorted(rt, key=lambda r: -abs(r["gold_chosen"] - r["gold_rejected"]))[: p["n_rt_pairs"] + p["n_rt_eval"]]
    rt = [rt[i] for i in np.random.default_rng(seed + 2).permutation(len(rt))]
    write_jsonl(d / "rt-eval.jsonl", rt[: p["n_rt_eval"]])
    write_jsonl(d / "rt-train.jsonl", rt[p["n_rt_eval"]:])
    agree = float(np.mean([r["gold_chosen"] > r["gold_rejected"] for r in rows]))
    rt_agree = float(np.mean([r["gold_chosen"] > r["gold_rejected"] for r in rt]))
    return {"train_pairs": len(rows) - n_eval, "eval_pairs": n_eval, "label_agrees_with_gold": agree,
            "sample_gold_mean": float(scores.mean()), "samples_ending_in_eos": float(np.mean(ended)),
            "rt_pairs": len(rt), "rt_label_agrees_with_gold": rt_agree, **compute}


def stage_dpo(d: Path, start: Path, train_file: Path, eval_file: Path, p: dict, beta: float, seed: int,
              quiet: bool, sft_on_chosen: bool, tokens: int, epochs: float) -> dict:
    model = start
    # a stage that runs again starts over (an interrupted attempt may have left a partial run in its dir)
    common = dict(batch_size=p["dpo_batch"], max_length=max_len(p, tokens), max_prompt_length=2 * p["prompt_tokens"],
                  seed=seed, quiet=quiet, overwrite=True)
    if sft_on_chosen:  # the paper's reference choice (a): the reference is fine-tuned on the chosen responses
        c = TrainConfig(model=str(start), data=str(train_file), out=str(d / "sft-chosen"), lr=p["sft_lr"] / 3,
                        max_steps=p["chosen_sft_steps"], schedule="constant", **common)
        train(c, mode="sft")
        model = d / "sft-chosen"
    c = TrainConfig(model=str(model), data=str(train_file), eval_data=str(eval_file), out=str(d / "model"),
                    ref="init", beta=beta, lr=dpo_lr(p, beta), warmup_steps=p["dpo_warmup"], epochs=epochs,
                    eval_every=p["eval_every"], eval_on_start=True, save_every=p["eval_every"], keep_last=1000,
                    precompute_ref=True, cache_dir=str(d / "ref-cache"), **common)
    res = train(c, mode="dpo")
    ev = [m for m in res.metrics if m["split"] == "eval"]
    return {"model": str(d / "model"), "reference": str(model), "beta": beta, "steps": res.steps,
            "train_file": str(train_file), "eval_file": str(eval_file),
            "eval_margin": ev[-1]["rewards/margin"], "eval_accuracy": ev[-1]["rewards/accuracy"],
            "eval_loss": ev[-1]["loss"]}


# ------------------------------------------------------------------------------------------------ pipeline


def dpo_lr(p: dict, beta: float) -> float:
    """The profile's DPO learning rate, scaled down by beta_0 / beta for a larger beta: Adam moves log pi/pi_ref at
    about the same rate whatever beta is, so the implicit rewards beta * log pi/pi_ref move beta / beta_0 times
    faster, and beta 0.5 at the beta-0.1 rate overshot (full profile: held-out loss 1.45, above ln 2)."""
    return p["dpo_lr"] * min(1.0, p["betas"][0] / beta)


def dpo_plan(p: dict) -> dict[str, dict[str, Any]]:
    """Every DPO run: name -> (start from SFT on chosen?, train file, eval file, beta, completion tokens)."""
    b0 = p["betas"][0]
    on, rt = ("train.jsonl", "eval.jsonl"), ("rt-train.jsonl", "rt-eval.jsonl")
    plan = {"dpo-a": (True, on, b0), "dpo-b": (False, on, b0), "dpo-shuffled": (False, ("train-shuffled.jsonl",
                                                                                      "eval.jsonl"), b0),
            "dpo-a-rt": (True, rt, b0), "dpo-b-rt": (False, rt, b0)}
    for b in p["betas"][1:]:
        plan[f"dpo-b-beta{b:g}"] = (False, on, b)
    return {k: {"sft_on_chosen": a, "files": f, "beta": b, "tokens": p["rt_tokens"] if f == rt else p["pair_tokens"],
                "epochs": p["rt_epochs"] if f == rt else p["dpo_epochs"]} for k, (a, f, b) in plan.items()}


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or reuse) every stage, write DIR/report.html and DIR/summary.json; returns the summary."""
    from rich.console import Console
    from rich.markup import escape

    p = PROFILES[cfg.profile]
    out = check_out_dir(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(quiet=False)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    st = Stages(out, {"profile": p, "seed": cfg.seed}, console)
    q, s = cfg.quiet, cfg.seed
    stages = {"data": st.run("data", (), lambda d: stage_data(d, p, s))}
    data = out / "data"
    stages["gold"] = st.run("gold", ("data",), lambda d: stage_gold(d, data, s))
    stages["judge"] = st.run("judge", ("data",), lambda d: stage_lm(d, data, "judge.jsonl", p, s + 7, q,
                                                                     p["judge_layers"], p["judge_steps"]))
    stages["sft"] = st.run("sft", ("data",), lambda d: stage_lm(d, data, "lm.jsonl", p, s, q, p["layers"],
                                                                 p["sft_steps"]))
    sft, gold, judge = out / "sft" / "model", out / "gold" / "gold.json", out / "judge" / "model"
    stages["pairs"] = st.run("pairs", ("sft", "gold"), lambda d: stage_pairs(d, data, sft, gold, p, s, q))
    pairs = out / "pairs"
    runs = {}
    for name, r in dpo_plan(p).items():
        tr, ev = (pairs / f for f in r["files"])
        runs[name] = st.run(name, ("pairs",), lambda d, r=r, tr=tr, ev=ev: stage_dpo(
            d, sft, tr, ev, p, r["beta"], s, q, r["sft_on_chosen"], r["tokens"], r["epochs"]))
    stages.update(runs)
    deps = tuple(runs)
    credit = st.run("credit", deps, lambda d: findings.credit(d, runs, sft, gold, data, p, q))
    search = st.run("search", deps + ("judge",), lambda d: findings.search(d, runs, data, sft, judge, gold, p, s, q))
    dynamics = st.run("dynamics", deps, lambda d: findings.dynamics(d, runs, p, s, q))
    summary = {"profile": cfg.profile, "seed": cfg.seed, "settings": p,
               "seconds_this_run": time.perf_counter() - t0, "seconds_compute": sum(st.timings.values()),
               "timings": st.timings, "reused_stages": st.reused, "stages": stages, "credit": credit,
               "search": search, "dynamics": dynamics}
    summary["claims"] = findings.claims(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=jsonable))
    report = write_report(out, summary)
    for t in key_tables(summary):
        console.print(t)
    console.print(f"report: {escape(str(report))}  ({summary['seconds_compute']:.0f}s of compute, "
                  f"{summary['seconds_this_run']:.0f}s this run)")
    return summary

