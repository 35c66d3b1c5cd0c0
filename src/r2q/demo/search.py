"""Finding 2, per seed: likelihood search on the DPO policy is search over Q*. Every method decodes the same
held-out prompts; each row keeps its per-prompt gold, degeneration-adjusted gold (every word counted once, so
repetition cannot raise it) and length, so that any two rows compare paired over prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..models import load_model, load_tokenizer
from ..search import GenerateConfig, encode_prompts, generate, score_sequences
from ..stats import distinct_n, mean_ci, paired_diff_ci, wins
from ..tasks.imdb_sentiment import load_gold
from .common import percentiles, read_jsonl, write_jsonl
from .methods import SWEEP, Method


@dataclass
class SearchRow:
    """One method's outputs on the prompts: means with 95% intervals, paired differences against greedy and
    temperature-1 sampling on the same policy, and the per-prompt values they came from."""

    method: Method
    gold: tuple[float, float, float]
    gold_once: tuple[float, float, float]  # every word counted once: repetition cannot raise it
    judge_nll: tuple[float, float, float]  # per token, under a separately trained LM (fluency)
    length: dict[str, float]
    eos_share: float
    distinct2: float
    logp: float
    log_ratio: float
    tokens_per_prompt: float | None
    example: str
    per_prompt: dict[str, list[float]]
    width_chosen: int | None = None  # what --budget chose
    vs_greedy: dict[str, Any] = field(default_factory=dict)
    vs_sample: dict[str, Any] = field(default_factory=dict)


def main_plan(p, main: bool) -> list[Method]:
    """The main table (DPO (b) at the first beta) or a table at another beta (baselines and beams only)."""
    plan = [Method("sample", temperature=t) for t in p.temperatures] + [Method("greedy")]
    plan += [Method("beam", width=k, length_penalty=lp) for lp in p.length_penalties for k in p.beams]
    if main:
        plan += [Method("reward-beam", width=4), Method("best-of-n", width=p.bon_n),
                 Method("mcts", width=p.mcts_sims, full_rollouts=True)]
        # Eq. 14 with the SFT model as the base (the policy's own reference): alpha = 1 would be the policy itself
        plan += [Method("guided", alpha=a) for a in p.guided_alphas]
    return plan



class _Measure:
    """Decodes a method on the seed's prompts with one policy/reference pair and measures the outputs."""

    def __init__(self, ctx, d: Path, run, judge, gold, rows: list[dict]):
        p = ctx.profile
        self.ctx, self.d, self.run, self.judge, self.gold = ctx, d, run, judge, gold
        d.mkdir(exist_ok=True)
        self.tok = load_tokenizer(run.model)
        self.policy, self.ref = load_model(run.model).eval(), load_model(run.reference).eval()
        self.prompts = [r["prompt"] for r in rows]
        self.enc = encode_prompts(self.tok, self.prompts)
        self.base = dict(max_new_tokens=p.search_tokens, beta=run.beta, seed=ctx.seed, batch_size=64)

    def row(self, m: Method) -> SearchRow:
        gens, compute = generate(self.policy, self.tok, self.prompts, GenerateConfig(**self.base, **m.config()),
                                 ref=self.ref)
        name = m.label.replace(" ", "_").replace("=", "")
        write_jsonl(self.d / f"{self.run.name}-{name}.jsonl", [g.as_dict() for g in gens])
        return self.measured(m, [g.text for g in gens], [g.token_ids for g in gens], [g.logp for g in gens],
                             [g.reward for g in gens], compute["tokens_processed"] / len(gens), compute.get("width"))

    def measured(self, m: Method, texts, toks, logp, reward, tokens_per_prompt, width) -> SearchRow:
        eos = self.tok.eos_token_id
        n = np.array([len(t) for t in toks], dtype=float)
        lp_j, _ = score_sequences(self.judge, None, self.enc, toks, eos, self.run.beta)
        gold, once = self.gold(texts), self.gold.once(texts)
        ended = np.array([bool(t) and t[-1] == eos for t in toks], dtype=float)
        d2 = np.array([distinct_n(t, 2) for t in toks])
        nb = self.ctx.profile.n_boot
        return SearchRow(m, mean_ci(gold, nb), mean_ci(once, nb), mean_ci(-np.array(lp_j) / np.maximum(n, 1), nb),
                         percentiles(n), float(ended.mean()), float(np.nanmean(d2)) if np.isfinite(d2).any() else
                         float("nan"), float(np.mean(logp)), float(np.mean(reward)) / self.run.beta,
                         tokens_per_prompt, texts[0],
                         {"gold": gold.round(5).tolist(), "gold_once": once.round(5).tolist(), "length": n.tolist(),
                          "eos": ended.tolist()}, width)


def _compare(rows: list[SearchRow], nb: int) -> None:
    """Each row against greedy and against temperature-1 samples of the same policy, paired over prompts."""
    greedy = next(r for r in rows if r.method.family == "greedy")
    sample = next(r for r in rows if r.method.family == "sample" and r.method.temperature == 1.0)
    for r in rows:
        for base, slot in ((greedy, r.vs_greedy), (sample, r.vs_sample)):
            if r is base:
                continue
            a, b = r.per_prompt, base.per_prompt
            slot["gold"] = paired_diff_ci(a["gold"], b["gold"], nb)
            slot["gold_once"] = paired_diff_ci(a["gold_once"], b["gold_once"], nb)
            slot["length"] = paired_diff_ci(a["length"], b["length"], nb)
            slot["win_rate"] = mean_ci(wins(a["gold"], b["gold"]), nb)


def stage_search(ctx, d: Path) -> dict[str, Any]:
    p, runs = ctx.profile, ctx.runs()
    gold, judge = load_gold(ctx.dir("gold") / "gold.json"), load_model(ctx.dir("judge") / "model").eval()
    rows = read_jsonl(ctx.dir("data") / "search_prompts.jsonl")[: p.n_search]
    out: dict[str, Any] = {"prompts": len(rows), "max_new_tokens": p.search_tokens, "by_beta": {}}
    for name in ["dpo-b"] + [k for k in runs if k.startswith("dpo-b-beta")]:
        run = runs[name]
        ms = _Measure(ctx, d, run, judge, gold, rows)
        table = [ms.row(m) for m in main_plan(p, name == "dpo-b")]
        human = [ms.tok(r["human"]).input_ids + [ms.tok.eos_token_id] for r in rows]
        logp, reward = score_sequences(ms.policy, ms.ref, ms.enc, human, ms.tok.eos_token_id, run.beta)
        table.append(ms.measured(Method("human"), [r["human"] for r in rows], human, logp, reward, None, None))
        _compare(table, p.n_boot)
        out["by_beta"][f"{run.beta:g}"] = {"run": name, "rows": [asdict(r) for r in table]}
        if name == "dpo-b":  # every method with a width, at the same tokens processed per prompt
            sw = _Measure(ctx, d / "equal-compute", run, judge, gold, rows[: p.n_sweep])
            sweep = [sw.row(Method("sample", temperature=1.0)), sw.row(Method("greedy"))]
            sweep += [sw.row(Method(f, budget=b)) for b in p.budgets for f in SWEEP]
            _compare(sweep, p.n_boot)
            out["equal_compute"] = {"run": name, "budgets": list(p.budgets), "prompts": len(sw.prompts),
                                    "rows": [asdict(r) for r in sweep]}
    return out


def rows_of(block: dict[str, Any]) -> list[SearchRow]:
    """The SearchRows of a summary's table (as stage.json stores them)."""
    return [SearchRow(**dict(r, method=Method(**r["method"]))) for r in block["rows"]]
