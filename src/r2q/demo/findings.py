"""The demo's measurements: credit against gold (with nulls, intervals and the edit test), search, reward dynamics,
and the claims computed from them. Every number a claim uses comes with a bootstrap interval over independent
units (pairs, prompts, edits); see r2q.stats."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import list_checkpoints
from ..credit import score_examples, score_pairs, top_tokens
from ..data import SFTExample, preference_examples_from_rows
from ..models import load_model, load_tokenizer
from ..rewards import token_rewards
from ..search import GenerateConfig, encode_prompts, generate, score_sequences
from ..stats import distinct_n, grouped_spearman_ci, mean_ci, paired_diff_ci, wins
from ..tasks.imdb_sentiment import load_gold
from ..views.html import write_html
from ..views.plots import plot_credit
from .common import max_len, read_jsonl, write_jsonl

NULLS = ("untrained", "shuffled", "sft-chosen")
RUN_OF = {"dpo-a": "dpo-a", "dpo-b": "dpo-b", "shuffled": "dpo-shuffled"}  # credit models that are DPO runs


def _models(runs: dict, sft: Path) -> dict[str, tuple[str, Path, Path | None]]:
    """Credit models: key -> (label, policy, reference or None for the reference-free beta log pi)."""
    a, b, sh = runs["dpo-a"], runs["dpo-b"], runs["dpo-shuffled"]
    return {"dpo-a": ("DPO (a): reference = SFT on chosen", Path(a["model"]), Path(a["reference"])),
            "dpo-b": ("DPO (b): reference = SFT", Path(b["model"]), Path(b["reference"])),
            "untrained": ("null: beta log pi_SFT (no preference training)", sft, None),
            "shuffled": ("null: DPO (b) on shuffled labels", Path(sh["model"]), Path(sh["reference"])),
            "sft-chosen": ("null: beta log pi_SFT-on-chosen / pi_SFT", Path(a["reference"]), sft)}


class _Loader:
    """Models by path, loaded once; `keep=False` loads without keeping (checkpoints scored once)."""

    def __init__(self):
        self.cache: dict[str, Any] = {}

    def __call__(self, path: Path | None, keep: bool = True):
        if path is None:
            return None
        if str(path) in self.cache:
            return self.cache[str(path)]
        model = load_model(path).eval()
        if keep:
            self.cache[str(path)] = model
        return model


# ------------------------------------------------------------------------------------------------ finding 1


def credit(d: Path, runs: dict, sft: Path, gold_path: Path, data: Path, p: dict, quiet: bool) -> dict[str, Any]:
    tok, gold, load, beta = load_tokenizer(sft), load_gold(gold_path), _Loader(), p["betas"][0]
    rows = read_jsonl(Path(runs["dpo-b"]["eval_file"]))
    kw = dict(max_length=max_len(p, p["pair_tokens"]), max_prompt_length=2 * p["prompt_tokens"], delimiter=None,
              use_cache=False)
    edits = make_edits(_edit_sources(tok, rows, data, kw), sentiment_swaps(tok, gold, p["edit_words"]))
    out: dict[str, Any] = {"models": {}, "edits": len(edits)}
    scored = {}  # run name -> its held-out report, where a credit model is a DPO run on these pairs
    for key, (label, pol_path, ref_path) in _models(runs, sft).items():
        policy, ref = load(pol_path), load(ref_path)
        rep = score_pairs(policy, ref, tok, rows, beta, progress=not quiet, **kw)
        if (run := RUN_OF.get(key)) is not None:
            scored[run] = rep
        xs, ys, grp = [], [], []
        for i, item in enumerate(rep.items()):
            for r, g in zip(item.rewards, gold.token_weights(item.tokens)):
                if g != 0.0:
                    xs.append(r), ys.append(g), grp.append(i // 2)
        rho = grouped_spearman_ci(xs, ys, grp, p["n_boot"])
        pos, neg = top_tokens(tok, rep.items(), k=10, min_count=20)
        out["models"][key] = {
            "label": label, "null": key in NULLS, "spearman": rho, "tokens": len(xs), "pairs": len(rep.pairs),
            "top_positive": [(t.token, round(t.mean_reward, 4), t.count) for t in pos],
            "top_negative": [(t.token, round(t.mean_reward, 4), t.count) for t in neg],
            "edit_test": edit_test(policy, ref, tok, edits, beta, p["n_boot"]),
        }
        if key == "dpo-b":
            write_html(rep, d / "credit.html", title="r2q demo: per-token implicit rewards, DPO (b), held-out pairs")
            best = sorted(rep.pairs, key=lambda x: -abs(x.margin))[:3]
            plot_credit(type(rep)(rep.kind, rep.beta, rep.summary, rep.top_positive, rep.top_negative, pairs=best),
                        d / "credit.png", max_items=2)
    out["heldout"] = heldout(runs, tok, load, p, kw, quiet, scored)
    return out


def heldout(runs: dict, tok, load, p: dict, kw: dict, quiet: bool, scored: dict) -> dict[str, Any]:
    """Final held-out DPO loss, pair accuracy and rewards of every run, per pair, with intervals. `scored`: the
    reports of runs already scored on their held-out pairs with these settings."""
    out = {}
    for name, r in runs.items():
        rep = scored.get(name)
        if rep is None:
            k = dict(kw, max_length=max_len(p, p["rt_tokens"] if "-rt" in name else p["pair_tokens"]))
            rep = score_pairs(load(Path(r["model"])), load(Path(r["reference"])), tok,
                              read_jsonl(Path(r["eval_file"])), r["beta"], progress=not quiet, **k)
        P = rep.pairs
        out[name] = {"loss": mean_ci([x.loss for x in P], p["n_boot"]),
                     "accuracy": mean_ci([float(x.correct) for x in P], p["n_boot"]),
                     "chosen_reward": mean_ci([x.chosen.reward for x in P], p["n_boot"]),
                     "rejected_reward": mean_ci([x.rejected.reward for x in P], p["n_boot"]),
                     "margin": mean_ci([x.margin for x in P], p["n_boot"]), "pairs": len(P)}
    return out


def sentiment_swaps(tok, gold, k: int) -> list[tuple[int, int, str, str]]:
    """(positive id, negative id, words): the k strongest positive and k strongest negative gold words that are
    one token with a leading space, paired by rank (strongest with strongest)."""
    cands = []
    for word, w in gold.weights.items():
        ids = tok(" " + word, add_special_tokens=False).input_ids
        if len(ids) == 1 and word.isalpha():
            cands.append((w, ids[0], word))
    cands.sort()
    neg, pos = cands[:k], cands[::-1][:k]
    return [(pi, ni, pw, nw) for (_, pi, pw), (_, ni, nw) in zip(pos, neg)]


def _edit_sources(tok, rows: list[dict], data: Path, kw: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of held-out text: both sides of the held-out pairs (SFT samples) and the
    human continuations of the search prompts."""
    ex, _ = preference_examples_from_rows(rows, tok, kw["max_length"], kw["max_prompt_length"])
    out = [(e.prompt_ids, c) for e in ex for c in (e.chosen_ids, e.rejected_ids)]
    human = read_jsonl(data / "search_prompts.jsonl")
    out += zip(encode_prompts(tok, [r["prompt"] for r in human]), (tok(r["human"]).input_ids for r in human))
    return [(a, b) for a, b in out if a and b]


def make_edits(sources, swaps) -> list[dict]:
    """For each completion, its first strongly positive word swapped for its negative partner (direction -1) and,
    separately, its first strongly negative word swapped for its positive partner (+1)."""
    to_neg = {pi: ni for pi, ni, _, _ in swaps}
    to_pos = {ni: pi for pi, ni, _, _ in swaps}
    edits = []
    for prompt, comp in sources:
        for table, direction in ((to_neg, -1), (to_pos, 1)):
            t = next((i for i, x in enumerate(comp) if x in table), None)
            if t is not None:
                edited = list(comp)
                edited[t] = table[comp[t]]
                edits.append({"prompt": prompt, "orig": list(comp), "edited": edited, "t": t,
                              "direction": direction})
    return edits


def edit_test(policy, ref, tok, edits: list[dict], beta: float, n_boot: int) -> dict[str, Any]:
    """The paper's test: score each completion and its one-word edit; per token, delta = r(edited) - r(original).
    A hit: the most negative delta (positive word -> negative) or the most positive (negative -> positive) is at
    the edited token. Tokens before the edit have delta 0 exactly (same prefix), so 'unedited' means after it."""
    if not edits:
        return {"edits": 0}
    ex = [SFTExample(e["prompt"], c, i) for i, e in enumerate(edits) for c in (e["orig"], e["edited"])]
    rep = score_examples(policy, ref, tok, ex, beta, delimiter=None, use_cache=False)
    items = rep.items()
    hits, at_edit, after, dirs = [], [], [], []
    for i, e in enumerate(edits):
        delta = np.array(items[2 * i + 1].rewards) - np.array(items[2 * i].rewards)
        t, s = e["t"], e["direction"]
        hits.append(float((np.argmax(delta) if s > 0 else np.argmin(delta)) == t))
        at_edit.append(float(delta[t]))
        after.append(float(np.abs(delta[t + 1:]).mean()) if len(delta) > t + 1 else 0.0)
        dirs.append(s)
    hits_a, at_a, dirs_a = np.array(hits), np.array(at_edit), np.array(dirs)
    out: dict[str, Any] = {"edits": len(edits), "hit_share": mean_ci(hits_a, n_boot),
                           "mean_abs_delta_after_edit": float(np.mean(after))}
    for s, name in ((-1, "pos_to_neg"), (1, "neg_to_pos")):
        m = dirs_a == s
        out[name] = {"edits": int(m.sum()), "hit_share": float(hits_a[m].mean()) if m.any() else float("nan"),
                     "mean_delta_at_edit": mean_ci(at_a[m], n_boot) if m.any() else None}
    return out


# ------------------------------------------------------------------------------------------------ finding 2


def _per_prompt(texts: list[str], toks: list[list[int]], logp: list[float], reward: list[float], enc, pad_id,
                gold, judge, beta) -> dict[str, np.ndarray]:
    """Per-prompt measures of one method's outputs; log pi and the implicit reward come from the caller."""
    n = np.array([len(t) for t in toks], dtype=float)
    lp_j, _ = score_sequences(judge, None, enc, toks, pad_id, beta)
    return {"gold": gold(texts), "length": n, "eos": np.array([bool(t) and t[-1] == pad_id for t in toks], float),
            "distinct2": np.array([distinct_n(t, 2) for t in toks]), "judge_nll": -np.array(lp_j) / np.maximum(n, 1),
            "logp": np.array(logp), "log_ratio": np.array([x / beta for x in reward])}


def _cell(label: str, m: dict[str, np.ndarray], base: dict[str, np.ndarray] | None, n_boot: int, extra: dict) -> dict:
    d2 = m["distinct2"][np.isfinite(m["distinct2"])]
    row = {"method": label, "gold": mean_ci(m["gold"], n_boot), "length": float(m["length"].mean()),
           "eos_share": float(m["eos"].mean()), "distinct2": float(d2.mean()) if len(d2) else float("nan"),
           "judge_nll": mean_ci(m["judge_nll"], n_boot), "logp": float(m["logp"].mean()),
           "log_ratio": float(m["log_ratio"].mean()),
           "per_prompt": {"gold": m["gold"].round(5).tolist(), "length": m["length"].tolist()}, **extra}
    if base is not None:
        row["gold_vs_sample"] = paired_diff_ci(m["gold"], base["gold"], n_boot)
        row["win_rate_vs_sample"] = mean_ci(wins(m["gold"], base["gold"]), n_boot)
        row["length_vs_sample"] = paired_diff_ci(m["length"], base["length"], n_boot)
    return row


def search_plan(p: dict, main: bool) -> list[tuple[str, dict]]:
    plan = [("sample (1 beam)", dict(method="sample")), ("greedy", dict(method="greedy"))]
    plan += [(f"beam {k} lp {lp:g}", dict(method="beam", num_beams=k, length_penalty=lp))
             for lp in p["length_penalties"] for k in p["beams"]]
    if main:
        plan += [("reward-beam 4", dict(method="reward-beam", num_beams=4)),
                 (f"best-of-{p['bon_n']} (implicit reward)", dict(method="best-of-n", num_samples=p["bon_n"])),
                 (f"mcts {p['mcts_sims']} sims (full rollouts)",
                  dict(method="mcts", simulations=p["mcts_sims"], expand_top_k=8, rollout_len=0))]
        # Eq. 14 with the SFT model as the base (the policy's own reference): alpha = 1 would be the policy itself
        plan += [(f"guided alpha {a:g}", dict(method="guided", alpha=a)) for a in p["guided_alphas"]]
    return plan


# the methods with a width, as the equal-compute sweep runs them (--budget sets the width)
SWEEP = [("best-of-n", dict(method="best-of-n")), ("beam", dict(method="beam")),
         ("reward-beam", dict(method="reward-beam")), ("chunk-beam", dict(method="chunk-beam", num_samples=2)),
         ("mcts", dict(method="mcts", expand_top_k=8))]


def search(d: Path, runs: dict, data: Path, sft: Path, judge_path: Path, gold_path: Path, p: dict, seed: int,
           quiet: bool) -> dict[str, Any]:
    tok, gold, load = load_tokenizer(sft), load_gold(gold_path), _Loader()
    judge, pad = load(judge_path), tok.eos_token_id
    rows = read_jsonl(data / "search_prompts.jsonl")[: p["n_search"]]
    prompts = [r["prompt"] for r in rows]
    enc = encode_prompts(tok, prompts)
    human_toks = [tok(r["human"]).input_ids + ([pad] if r["human_eos"] else []) for r in rows]
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": p["search_tokens"], "by_beta": {}}
    for name in ["dpo-b"] + [k for k in runs if k.startswith("dpo-b-beta")]:
        run, beta = runs[name], runs[name]["beta"]
        policy, ref = load(Path(run["model"])), load(Path(run["reference"]))
        base = dict(max_new_tokens=p["search_tokens"], beta=beta, seed=seed, batch_size=16)
        human = _per_prompt([r["human"] for r in rows], human_toks,
                            *score_sequences(policy, ref, enc, human_toks, pad, beta), enc, pad, gold, judge, beta)
        cells: list[dict] = []
        sample = None

        def measure(label: str, cfg: GenerateConfig, extra: dict | None = None) -> dict:
            nonlocal sample
            gens, compute = generate(policy, tok, prompts, cfg, ref=ref, progress=not quiet)  # noqa: B023
            m = _per_prompt([g.text for g in gens], [g.token_ids for g in gens], [g.logp for g in gens],
                            [g.reward for g in gens], enc, pad, gold, judge, beta)  # noqa: B023
            sample = m if label.startswith("sample") else sample
            write_jsonl(d / f"{name}-{label.replace(' ', '_')}.jsonl", [g.as_dict() for g in gens])  # noqa: B023
            width = {"width": compute["width"]} if "width" in compute else {}  # what --budget chose
            return _cell(label, m, sample, p["n_boot"], {
                "tokens_per_prompt": compute["tokens_processed"] / len(prompts), "example": gens[0].text,
                **width, **(extra or {})})

        for label, kw in search_plan(p, name == "dpo-b"):
            cells.append(measure(label, GenerateConfig(**base, **kw)))
        cells.append(_cell("human continuation", human, sample, p["n_boot"], {"example": rows[0]["human"]}))
        out["by_beta"][f"{beta:g}"] = {"run": name, "rows": cells}
        if name == "dpo-b":  # every method with a width, at the same tokens processed per prompt
            sweep = []
            for budget in p["budgets"]:
                for method, kw in SWEEP:
                    sweep.append(measure(f"{method} at {budget}", GenerateConfig(**base, **kw, budget=budget),
                                         {"budget": budget, "family": method}))
            # where a search finds nothing better than greedy decoding: gold - greedy's gold, paired by prompt
            greedy = np.array(next(c for c in cells if c["method"] == "greedy")["per_prompt"]["gold"])
            for c in cells[2:-1] + sweep:
                c["gold_vs_greedy"] = paired_diff_ci(np.array(c["per_prompt"]["gold"]), greedy, p["n_boot"])
            out["equal_compute"] = {"run": name, "budgets": list(p["budgets"]), "rows": sweep}
    return out


# ------------------------------------------------------------------------------------------------ finding 3


def dynamics(d: Path, runs: dict, p: dict, seed: int, quiet: bool) -> dict[str, Any]:
    """Held-out implicit rewards along training (from the trainer's metrics, step 0 measured before the first
    update) and E_{y~pi_ref}[beta log pi/pi_ref] at every checkpoint, from samples of the reference."""
    load = _Loader()
    out: dict[str, Any] = {}
    for name in ("dpo-a", "dpo-b", "dpo-a-rt", "dpo-b-rt"):
        run, beta = runs[name], runs[name]["beta"]
        tok = load_tokenizer(run["reference"])
        prompts = [r["prompt"] for r in read_jsonl(Path(run["eval_file"]))][: p["n_ref_samples"]]
        ref = load(Path(run["reference"]))
        cfg = GenerateConfig(method="sample", max_new_tokens=p["pair_tokens"], seed=seed, batch_size=64)
        samples, _ = generate(ref, tok, prompts, cfg, progress=not quiet)
        enc, toks = encode_prompts(tok, prompts), [g.token_ids for g in samples]
        ref_lp = np.array([g.logp for g in samples])  # log pi_ref(y|x), as the sampler scored it
        # step 0: the starting policy is the reference's weights, scored like every checkpoint (not assumed)
        points = [(0, Path(run["reference"]))] + [(int(c.name.split("-")[1]), c) for c in
                                                   list_checkpoints(Path(run["model"]))]
        curve = []
        for step, path in points:
            pol = load(path, keep=step == 0)
            r = token_rewards(np.array(score_sequences(pol, None, enc, toks, tok.eos_token_id, beta)[0]), ref_lp, beta)
            curve.append({"step": step, "expected_reward_under_ref": float(r.mean()),
                          "stderr": float(r.std() / math.sqrt(len(r)))})
        metrics = read_jsonl(Path(run["model"]) / "metrics.jsonl")
        out[name] = {"ref_samples": len(prompts), "kl_curve": curve,
                     "train": [m for m in metrics if m["split"] == "train"],
                     "eval": [m for m in metrics if m["split"] == "eval"]}
    return out


# ------------------------------------------------------------------------------------------------ claims


def _claim(finding: str, statement: str, statistic: str, interval, holds: bool, **extra) -> dict[str, Any]:
    est, lo, hi = interval
    return {"finding": finding, "statement": statement, "statistic": statistic, "estimate": est,
            "ci95": [lo, hi], "holds": bool(holds), **extra}


def claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each finding's statements, tested on the run's own numbers (95% bootstrap intervals)."""
    cr, se, p = summary["credit"], summary["search"], summary["settings"]
    out = []
    for name, h in cr["heldout"].items():
        if name == "dpo-shuffled":
            continue
        out.append(_claim("training", f"{name}: held-out DPO loss below ln 2 = 0.693", "held-out loss",
                          h["loss"], h["loss"][0] < math.log(2)))
        out.append(_claim("training", f"{name}: held-out pair accuracy at least 0.65", "held-out accuracy",
                          h["accuracy"], h["accuracy"][0] >= 0.65))
    models = cr["models"]
    null_hi = max(models[k]["spearman"][2] for k in NULLS)
    for k in ("dpo-a", "dpo-b"):
        out.append(_claim("1 credit", f"{k}: Spearman(token reward, gold word weight) lies above every null's "
                          f"interval (highest null upper bound {null_hi:.3f})", "Spearman",
                          models[k]["spearman"], models[k]["spearman"][1] > null_hi))
        e = models[k]["edit_test"]
        if e.get("edits"):
            nulls = {n: models[n]["edit_test"]["hit_share"][0] for n in NULLS}
            out.append(_claim("1 credit", f"{k}: in at least 80% of one-word sentiment edits the extreme reward "
                              "change lands on the edited word", "hit share", e["hit_share"],
                              e["hit_share"][0] >= 0.8, nulls=nulls))
    rows = {r["method"]: r for r in se["by_beta"][f"{p['betas'][0]:g}"]["rows"]}
    wide = max(p["beams"])
    k_small = 4 if 4 in p["beams"] and wide > 4 else min(p["beams"])  # 4: near the paper's best width, 5
    for lp in p["length_penalties"]:
        small, big = rows[f"beam {k_small} lp {lp:g}"], rows[f"beam {wide} lp {lp:g}"]
        out.append(_claim("2 search", f"beam {k_small} (length penalty {lp:g}) beats temperature-1 sampling on gold",
                          "gold(beam) - gold(sample), paired over prompts", small["gold_vs_sample"],
                          small["gold_vs_sample"][1] > 0, win_rate=small["win_rate_vs_sample"]))
        if wide == k_small:  # one width: nothing wider to compare with
            continue
        g = [np.array(x["per_prompt"]["gold"]) for x in (big, small)]
        diff = paired_diff_ci(g[0], g[1], p["n_boot"])
        out.append(_claim("2 search", f"beam {wide} scores lower gold than beam {k_small} (length penalty {lp:g}):"
                          " over-optimisation", f"gold(beam {wide}) - gold(beam {k_small}), paired", diff,
                          diff[2] < 0))
        n = [np.array(x["per_prompt"]["length"]) for x in (big, small)]
        diff = paired_diff_ci(n[0], n[1], p["n_boot"])
        out.append(_claim("2 search", f"beam {wide} gives longer outputs than beam {k_small} "
                          f"(length penalty {lp:g})", f"length(beam {wide}) - length(beam {k_small}), paired",
                          diff, diff[1] > 0))
    fin = {n: cr["heldout"][n] for n in ("dpo-a", "dpo-b", "dpo-a-rt", "dpo-b-rt")}
    for n in ("dpo-a", "dpo-a-rt"):
        out.append(_claim("3 dynamics", f"{n} (reference SFT-trained on chosen): held-out chosen rewards fall "
                          "below 0", "final mean chosen reward", fin[n]["chosen_reward"],
                          fin[n]["chosen_reward"][2] < 0))
        out.append(_claim("3 dynamics", f"{n}: held-out rejected rewards fall below 0", "final mean rejected reward",
                          fin[n]["rejected_reward"], fin[n]["rejected_reward"][2] < 0))
    out.append(_claim("3 dynamics", "dpo-b-rt (reference never trained on the off-distribution chosen): held-out "
                      "chosen rewards stay above 0, as the paper reports", "final mean chosen reward",
                      fin["dpo-b-rt"]["chosen_reward"], fin["dpo-b-rt"]["chosen_reward"][1] > 0))
    for n in fin:
        out.append(_claim("3 dynamics", f"{n}: the held-out margin is positive", "final mean margin",
                          fin[n]["margin"], fin[n]["margin"][1] > 0))
    return out

