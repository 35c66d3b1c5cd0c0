"""Finding 1, per seed: does the per-token implicit reward point at the tokens that decide the preference?

Two measurements, each against nulls that have no preference training or none that points anywhere:
- Spearman correlation of the token reward with the gold classifier's word weight, over held-out pairs;
- the edit test: a sentiment word swapped for one of the opposite sentiment (and, as a placebo, a neutral word for
  a neutral word) in held-out text; the reward change on the edited word, signed by the edit's direction, paired
  edit by edit between DPO and each null, bootstrapped over source texts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..credit import score_examples, score_pairs, top_tokens
from ..data import SFTExample, preference_examples_from_rows
from ..models import load_model, load_tokenizer
from ..search import encode_prompts
from ..stats import cluster_bootstrap, grouped_spearman_ci, slope, spearman_margin_ci
from ..tasks.imdb_sentiment import load_gold
from ..views.html import write_html
from ..views.plots import plot_credit
from .common import read_jsonl
from .dpo import DPORun

NULLS = ("untrained", "shuffled", "sft-chosen")
DPO = ("dpo-a", "dpo-b")


def credit_models(runs: dict[str, DPORun], sft: Path) -> dict[str, tuple[str, Path, Path | None]]:
    """Credit models: key -> (label, policy, reference or None for the reference-free beta log pi)."""
    a, b, sh = runs["dpo-a"], runs["dpo-b"], runs["dpo-shuffled"]
    return {"dpo-a": ("DPO (a): reference = SFT on chosen", Path(a.model), Path(a.reference)),
            "dpo-b": ("DPO (b): reference = SFT", Path(b.model), Path(b.reference)),
            "untrained": ("null: beta log pi_SFT (no preference training)", sft, None),
            "shuffled": ("null: DPO (b) on shuffled labels", Path(sh.model), Path(sh.reference)),
            "sft-chosen": ("null: beta log pi_SFT-on-chosen / pi_SFT", Path(a.reference), sft)}


@dataclass(frozen=True)
class Edit:
    """One swapped token in a held-out completion. kind: 'sentiment' (direction -1: a positive word made
    negative, +1: the reverse) or 'placebo' (a neutral word for a neutral word; direction: the sign of the gold
    weight change, which is small)."""

    source: int  # the completion it edits (edits of one source are resampled together)
    prompt: tuple[int, ...]
    orig: tuple[int, ...]
    edited: tuple[int, ...]
    t: int
    direction: int
    kind: str


def word_swaps(tok, gold, k: int, neutral: bool) -> list[tuple[int, int, float, float]]:
    """(id a, id b, weight a, weight b) of single-token words (with a leading space). Sentiment: the k strongest
    positive words paired by rank with the k strongest negative ones. Neutral: the 2k words of smallest absolute
    weight among those of at least 4 letters, paired in order."""
    cands = []
    for word, w in gold.weights.items():
        ids = tok(" " + word, add_special_tokens=False).input_ids
        if len(ids) == 1 and word.isalpha():
            cands.append((w, ids[0], word))
    if neutral:
        calm = sorted((c for c in cands if len(c[2]) >= 4), key=lambda c: abs(c[0]))[: 2 * k]
        return [(a[1], b[1], a[0], b[0]) for a, b in zip(calm[0::2], calm[1::2])]
    cands.sort()
    neg, pos = cands[:k], cands[::-1][:k]
    return [(p[1], n[1], p[0], n[0]) for p, n in zip(pos, neg)]


def make_edits(sources: list[tuple[list[int], list[int]]], swaps, placebo) -> list[Edit]:
    """Per completion: its first strongly positive token made negative (-1), its first strongly negative token
    made positive (+1), and its first placebo word swapped for its partner."""
    to_neg = {a: b for a, b, _, _ in swaps}
    to_pos = {b: a for a, b, _, _ in swaps}
    calm = {a: (b, np.sign(wb - wa)) for a, b, wa, wb in placebo} | {b: (a, np.sign(wa - wb)) for a, b, wa, wb in
                                                                      placebo}
    edits = []
    for s, (prompt, comp) in enumerate(sources):
        tables = [({x: (y, -1) for x, y in to_neg.items()}, "sentiment"),
                  ({x: (y, 1) for x, y in to_pos.items()}, "sentiment"), (calm, "placebo")]
        for table, kind in tables:
            t = next((i for i, x in enumerate(comp) if x in table), None)
            if t is not None:
                new, direction = table[comp[t]]
                edited = list(comp)
                edited[t] = new
                edits.append(Edit(s, tuple(prompt), tuple(comp), tuple(edited), t, int(direction) or 1, kind))
    return edits


def edit_measures(policy, ref, tok, edits: list[Edit], beta: float) -> dict[str, np.ndarray]:
    """Per edit, from the token rewards of the original and the edited completion (delta = edited - original):
    signed = direction * delta at the edit; hit = the extreme delta (most negative for -1, most positive for +1;
    for placebo edits the largest |delta|) is at the edit; sum_delta = the sequence reward change; picture = in the
    edited response itself, its most negative (-1) or most positive (+1) token reward is the edited token, the
    paper's figure; chance = 1 / the completion's length."""
    seqs = list(dict.fromkeys((e.prompt, c) for e in edits for c in (e.orig, e.edited)))  # an original once
    at = {x: i for i, x in enumerate(seqs)}
    ex = [SFTExample(list(p), list(c), i) for i, (p, c) in enumerate(seqs)]
    items = score_examples(policy, ref, tok, ex, beta, delimiter=None, use_cache=False).items()
    out: dict[str, list[float]] = {k: [] for k in ("signed", "hit", "sum_delta", "picture", "chance")}
    for e in edits:
        r0 = np.array(items[at[e.prompt, e.orig]].rewards)
        r1 = np.array(items[at[e.prompt, e.edited]].rewards)
        delta = r1 - r0
        if e.kind == "placebo":
            hit = np.argmax(np.abs(delta)) == e.t
        else:
            hit = (np.argmax(delta) if e.direction > 0 else np.argmin(delta)) == e.t
        out["signed"].append(e.direction * delta[e.t])
        out["hit"].append(float(hit))
        out["sum_delta"].append(float(delta.sum()))
        out["picture"].append(float((np.argmax(r1) if e.direction > 0 else np.argmin(r1)) == e.t))
        out["chance"].append(1.0 / len(r1))
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def _sources(tok, rows: list[dict], data: Path, max_length: int, max_prompt_length: int):
    """(prompt ids, completion ids) of held-out text: both sides of the held-out pairs (SFT samples) and the
    human continuations of the search prompts."""
    ex, _ = preference_examples_from_rows(rows, tok, max_length, max_prompt_length)
    out = [(e.prompt_ids, c) for e in ex for c in (e.chosen_ids, e.rejected_ids)]
    human = read_jsonl(data / "search_prompts.jsonl")
    out += zip(encode_prompts(tok, [r["prompt"] for r in human]), (tok(r["human"]).input_ids for r in human))
    return [(a, list(b)) for a, b in out if a and b]


@dataclass
class CreditModel:
    """One credit model's numbers on the held-out pairs and the edits."""

    label: str
    null: bool
    spearman: tuple[float, float, float]
    tokens: int
    top_positive: list
    top_negative: list
    hit_share: tuple[float, float, float]
    signed_change: tuple[float, float, float]
    picture_share: tuple[float, float, float]
    picture_over_chance: tuple[float, float, float]
    placebo_false_hits: tuple[float, float, float]
    placebo_signed_change: tuple[float, float, float]
    slope_vs_gold: tuple[float, float, float]


@dataclass
class _Scored:
    """One model's raw material for the paired comparisons: its token rewards at the gold-weighted tokens of the
    held-out pairs and its per-edit measures."""

    token_rewards: list[float]
    edits: dict[str, np.ndarray]


class _EditSet:
    """The edits of one seed, with what does not depend on the model: kinds, sources, gold changes."""

    def __init__(self, edits: list[Edit], tok, gold, n_boot: int):
        self.edits, self.n_boot = edits, n_boot
        kind = np.array([e.kind for e in edits])
        self.sent, self.calm = kind == "sentiment", kind == "placebo"
        self.src = np.array([e.source for e in edits])
        g = gold([tok.decode(list(x)) for e in edits for x in (e.orig, e.edited)])
        self.gold_change = g[1::2] - g[0::2]

    def mean(self, values: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
        """Mean over the edits in `mask`, bootstrapped over their source texts."""
        v = values[mask]
        return cluster_bootstrap(lambda i: v[i].mean(), self.src[mask], self.n_boot)

    def slope(self, sum_delta: np.ndarray) -> tuple[float, float, float]:
        """Slope of the summed reward change on the gold logit change, over sentiment edits."""
        g, y = self.gold_change[self.sent], sum_delta[self.sent]
        return cluster_bootstrap(lambda i: slope(g[i], y[i]), self.src[self.sent], self.n_boot)


def stage_credit(ctx, d: Path) -> dict[str, Any]:
    p, sft, beta = ctx.profile, ctx.dir("sft") / "model", ctx.profile.betas[0]
    runs = ctx.runs()
    tok, gold = load_tokenizer(sft), load_gold(ctx.dir("gold") / "gold.json")
    rows = read_jsonl(Path(runs["dpo-b"].eval_file))
    kw = dict(max_length=p.max_len(p.pair_tokens), max_prompt_length=2 * p.prompt_tokens)
    sources = _sources(tok, rows, ctx.dir("data"), **kw)
    es = _EditSet(make_edits(sources, word_swaps(tok, gold, p.edit_words, False),
                             word_swaps(tok, gold, p.placebo_words, True)), tok, gold, p.n_boot)
    out: dict[str, Any] = {"edits": int(es.sent.sum()), "placebo_edits": int(es.calm.sum()), "sources": len(sources),
                           "models": {}}
    scored: dict[str, _Scored] = {}
    ys: list[float] = []
    groups: list[int] = []
    for key, (label, pol_path, ref_path) in credit_models(runs, sft).items():
        policy, ref = load_model(pol_path).eval(), (load_model(ref_path).eval() if ref_path else None)
        rep = score_pairs(policy, ref, tok, rows, beta, delimiter=None, use_cache=False, **kw)
        xs, ys, groups = _gold_tokens(rep, gold)
        m = edit_measures(policy, ref, tok, es.edits, beta)
        scored[key] = _Scored(xs, m)
        pos, neg = top_tokens(tok, rep.items(), k=10, min_count=20)
        out["models"][key] = asdict(CreditModel(
            label, key in NULLS, grouped_spearman_ci(xs, ys, groups, p.n_boot), len(xs),
            [(t.token, round(t.mean_reward, 4), t.count) for t in pos],
            [(t.token, round(t.mean_reward, 4), t.count) for t in neg],
            es.mean(m["hit"], es.sent), es.mean(m["signed"], es.sent), es.mean(m["picture"], es.sent),
            es.mean(m["picture"] - m["chance"], es.sent), es.mean(m["hit"], es.calm), es.mean(m["signed"], es.calm),
            es.slope(m["sum_delta"])))
        if key == "dpo-b":
            write_html(rep, d / "credit.html", title="r2q demo: per-token implicit rewards, DPO (b), held-out pairs")
            best = sorted(rep.pairs, key=lambda x: -abs(x.margin))[:3]
            plot_credit(type(rep)(rep.kind, rep.beta, rep.summary, rep.top_positive, rep.top_negative, pairs=best),
                        d / "credit.png", max_items=2)
    out["paired"] = {k: _paired(scored, k, ys, groups, es) for k in DPO}
    return out


def _gold_tokens(rep, gold) -> tuple[list[float], list[float], list[int]]:
    """(token reward, gold word weight, pair index) of every completion token inside a word gold weighs."""
    xs, ys, groups = [], [], []
    for i, item in enumerate(rep.items()):
        for r, w in zip(item.rewards, gold.token_weights(item.tokens)):
            if w != 0.0:
                xs.append(r), ys.append(w), groups.append(i // 2)
    return xs, ys, groups


def _paired(scored: dict[str, _Scored], k: str, ys: list[float], groups: list[int], es: _EditSet) -> dict[str, Any]:
    """DPO run k against the nulls on the same tokens and the same edits: Spearman over the best null, the signed
    change minus each null's and minus the best null's, the slope minus the SFT-on-chosen null's; and k's hit share
    on sentiment edits minus its false-hit rate on placebo edits (sources resampled together)."""
    m, nb, sent, c = scored[k].edits, es.n_boot, es.sent, es.src[es.sent]
    mine = m["signed"][sent]
    nulls = np.stack([scored[n].edits["signed"][sent] for n in NULLS])
    g, y0, y1 = es.gold_change[sent], m["sum_delta"][sent], scored["sft-chosen"].edits["sum_delta"][sent]
    hit = m["hit"]  # a hit on sentiment edits, a false hit on placebo ones
    return {
        "spearman_minus_best_null": spearman_margin_ci(scored[k].token_rewards,
                                                       [scored[n].token_rewards for n in NULLS], ys, groups, nb),
        "signed_minus_null": {n: cluster_bootstrap(lambda i, j=j: (mine[i] - nulls[j, i]).mean(), c, nb)
                              for j, n in enumerate(NULLS)},
        "signed_minus_best_null": cluster_bootstrap(lambda i: mine[i].mean() - nulls[:, i].mean(axis=1).max(), c, nb),
        "slope_minus_sft_chosen": cluster_bootstrap(lambda i: slope(g[i], y0[i]) - slope(g[i], y1[i]), c, nb),
        "hit_minus_placebo_false_hit": cluster_bootstrap(
            lambda i: _masked_mean(hit[i], sent[i]) - _masked_mean(hit[i], es.calm[i]), es.src, nb),
    }


def _masked_mean(v: np.ndarray, mask: np.ndarray) -> float:
    return float(v[mask].mean()) if mask.any() else float("nan")
