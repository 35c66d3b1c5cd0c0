"""The demo's claims, tested in every seed and given one verdict across seeds.

In one seed a claim's statistic comes with a 95% interval: the seed supports the claim when the whole interval
clears the threshold, contradicts it when the whole interval lies on the other side, and is inconclusive when the
interval straddles it; a claim can also be untestable there, with the reason (say, outputs that do not end).
Across seeds (`verdict`): holds (every seed supports it), fails (every seed contradicts it), inconclusive (no seed
decides it), mixed (seeds disagree), or untestable (in some seed, with the reasons).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..stats import mean_ci, paired_diff_ci
from .methods import Method

Interval = tuple[float, float, float]
EOS_NEEDED = 0.8  # a length claim needs this share of outputs ending by EOS at both widths


@dataclass(frozen=True)
class Untestable:
    reason: str


def seed_status(interval: Interval, threshold: float, direction: str) -> str:
    """supports / contradicts / inconclusive for one seed. direction 'above': the claim is statistic > threshold;
    'below': statistic < threshold; 'within': threshold is (lo, hi) and the claim is lo <= statistic <= hi."""
    _, lo, hi = interval
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if direction == "above":
        return "supports" if lo > threshold else "contradicts" if hi < threshold else "inconclusive"
    if direction == "below":
        return "supports" if hi < threshold else "contradicts" if lo > threshold else "inconclusive"
    a, b = threshold
    return "supports" if a <= lo and hi <= b else "contradicts" if hi < a or lo > b else "inconclusive"


def verdict(statuses: list[str]) -> str:
    """One verdict from the seeds' statuses (see the module's docstring)."""
    if "untestable" in statuses:
        return "untestable"
    if all(s == "supports" for s in statuses):
        return "holds"
    if all(s == "contradicts" for s in statuses):
        return "fails"
    if all(s == "inconclusive" for s in statuses):
        return "inconclusive"
    return "mixed"


@dataclass(frozen=True)
class Claim:
    """A statement and how one seed's results test it: `get(seed results, shared results)` returns the statistic's
    (estimate, lower, upper) or Untestable."""

    id: str
    finding: str
    statement: str
    statistic: str
    threshold: Any
    direction: str
    get: Callable[[dict, dict], Interval | Untestable]

    def test(self, seeds: dict[str, dict], shared: dict) -> dict[str, Any]:
        per_seed, statuses = {}, []
        for s, res in seeds.items():
            try:
                x = self.get(res, shared)
            except KeyError as e:  # a profile without that run or width
                x = Untestable(f"not measured in this profile ({e})")
            if isinstance(x, Untestable):
                per_seed[s] = {"status": "untestable", "reason": x.reason}
            else:
                st = seed_status(x, self.threshold, self.direction)
                per_seed[s] = {"estimate": x[0], "ci95": [x[1], x[2]], "status": st}
            statuses.append(per_seed[s]["status"])
        est = [v["estimate"] for v in per_seed.values() if "estimate" in v]
        out = {"id": self.id, "finding": self.finding, "statement": self.statement, "statistic": self.statistic,
               "threshold": self.threshold, "direction": self.direction, "per_seed": per_seed,
               "verdict": verdict(statuses), "range": [min(est), max(est)] if est else None}
        if out["verdict"] == "untestable":
            out["reason"] = "; ".join(sorted({f"seed {s}: {v['reason']}" for s, v in per_seed.items()
                                              if v["status"] == "untestable"}))
        return out


# ----------------------------------------------------------------------------------------------- helpers


def _rows(res: dict, beta: str | None = None) -> dict[str, dict]:
    by = res["search"]["by_beta"]
    block = by[beta] if beta else next(iter(by.values()))
    return {_label(r["method"]): r for r in block["rows"]}


def _label(m: dict) -> str:
    return Method(**m).label


def _beam(res: dict, k: int, lp: float) -> dict:
    return _rows(res)[f"beam {k} lp {lp:g}"]


def _greedy(res: dict) -> dict:
    return _rows(res)["greedy"]


def crossfit_best_minus(arms: dict[int, np.ndarray], target: int, n_boot: int,
                        candidates: list[int] | None = None) -> Interval:
    """mean(gold(best width) - gold(target)), the best of `candidates` (default: every arm) chosen on the other half
    of the prompts: chosen on the even-numbered prompts and measured on the odd ones, and the reverse, so the
    selection does not inflate the estimate. Bootstrapped over prompts with the two selections fixed."""
    n = len(arms[target])
    halves = (np.arange(0, n, 2), np.arange(1, n, 2))
    diff = np.zeros(n)
    for pick, test in (halves, halves[::-1]):
        best = max(candidates or list(arms), key=lambda k: (arms[k][pick].mean(), -k))
        diff[test] = arms[best][test] - arms[target][test]
    return mean_ci(diff, n_boot)


def _arms(res: dict, lp: float, measure: str) -> dict[int, np.ndarray]:
    """Per-prompt `measure` of greedy decoding (width 1) and of every beam width at length penalty lp."""
    rows = _rows(res)
    arms = {1: np.array(rows["greedy"]["per_prompt"][measure])}
    arms |= {int(r["method"]["width"]): np.array(r["per_prompt"][measure]) for r in rows.values()
             if r["method"]["family"] == "beam" and r["method"]["length_penalty"] == lp}
    return arms


def _overopt(lp: float, measure: str, wide: int):
    def get(res: dict, shared: dict) -> Interval:
        return crossfit_best_minus(_arms(res, lp, measure), wide, shared["n_boot"])

    return get


def _best_beam_vs_greedy(lp: float):
    def get(res: dict, shared: dict) -> Interval:
        arms = _arms(res, lp, "gold")
        greedy = arms.pop(1)
        return crossfit_best_minus(arms | {1: greedy}, 1, shared["n_boot"], candidates=list(arms))

    return get


def _length(lp: float, small: int, wide: int):
    def get(res: dict, shared: dict) -> Interval | Untestable:
        a, b = _beam(res, wide, lp), _beam(res, small, lp)
        short = [f"beam {r['method']['width']} {r['eos_share']:.0%}" for r in (a, b) if r["eos_share"] < EOS_NEEDED]
        if short:
            return Untestable(f"fewer than {EOS_NEEDED:.0%} of outputs end by EOS ({', '.join(short)})")
        return paired_diff_ci(a["per_prompt"]["length"], b["per_prompt"]["length"], shared["n_boot"])

    return get


def _eos_beams(res: dict, shared: dict) -> Interval:
    """The lowest EOS share of any beam width (at either length penalty), with its interval over prompts."""
    beams = [r for r in _rows(res).values() if r["method"]["family"] in ("beam", "greedy")]
    worst = min(beams, key=lambda r: r["eos_share"])
    return mean_ci(worst["per_prompt"]["eos"], shared["n_boot"])


def _paired(res: dict, run: str) -> dict:
    return res["credit"]["paired"][run]


def _ival(x) -> Interval:
    return (float(x[0]), float(x[1]), float(x[2]))


# ----------------------------------------------------------------------------------------------- the claims


def claim_list(settings: dict, runs: list[str]) -> list[Claim]:
    """Every claim the demo tests, for a profile's settings and the DPO runs it has, in the report's order."""
    return _setup_claims(settings, runs) + _credit_claims() + _search_claims(settings) + _dynamics_claims()


def _setup_claims(settings: dict, runs: list[str]) -> list[Claim]:
    """The setup works: each DPO run learned (loss, accuracy), stayed near its reference (KL), and outputs end."""
    lo, hi = settings["kl_range"]
    C: list[Claim] = []
    trained = [r for r in runs if "shuffled" not in r]
    for r in trained:
        C.append(Claim(f"loss:{r}", "setup", f"{r}: held-out DPO loss below ln 2", "held-out loss", math.log(2),
                       "below", lambda res, sh, r=r: _ival(res["dynamics"]["runs"][r]["final"]["loss"])))
        C.append(Claim(f"accuracy:{r}", "setup", f"{r}: held-out pair accuracy at least 0.65", "held-out accuracy",
                       0.65, "above", lambda res, sh, r=r: _ival(res["dynamics"]["runs"][r]["final"]["correct"])))
    for r in runs:
        C.append(Claim(f"kl:{r}", "setup", f"{r}: final KL(pi_ref||pi) within {lo:g}-{hi:g} nats per sample",
                       "KL(pi_ref||pi), nats", (lo, hi), "within", lambda res, sh, r=r: _kl(res, r)))
    C.append(Claim("eos:sft", "setup", f"the SFT policy ends its samples by EOS (at least {EOS_NEEDED:.0%} at every "
                   "prompt length)", "lowest EOS share over prompt lengths", EOS_NEEDED, "above",
                   lambda res, sh: _ival(min((x["eos"] for x in sh["eos"]["by_prompt"]), key=lambda v: v[0]))))
    C.append(Claim("eos:beam", "setup", f"beam outputs end by EOS (at least {EOS_NEEDED:.0%} at every width)",
                   "lowest EOS share over widths", EOS_NEEDED, "above", _eos_beams))
    return C


def _credit_claims() -> list[Claim]:
    """Finding 1: the token rewards give credit where the gold reward does."""
    C: list[Claim] = []
    for k in ("dpo-a", "dpo-b"):
        C.append(Claim(f"spearman:{k}", "1 credit", f"{k}: token rewards follow gold word weights more closely than "
                       "every null's (Spearman, paired over pairs)", "Spearman - best null's Spearman", 0.0, "above",
                       lambda res, sh, k=k: _ival(res["credit"]["paired"][k]["spearman_minus_best_null"])))
        C.append(Claim(f"signed:{k}", "1 credit", f"{k}: the reward change on an edited sentiment word follows the "
                       "edit's direction more than under the SFT-on-chosen null (a likelihood shift), paired per "
                       "edit", "signed change - null's", 0.0, "above",
                       lambda res, sh, k=k: _ival(res["credit"]["paired"][k]["signed_minus_null"]["sft-chosen"])))
    C.append(Claim("placebo:dpo-b", "1 credit", "dpo-b: the extreme reward change lands on the edited word more "
                   "often for sentiment swaps than for neutral (placebo) swaps", "hit share - placebo false hits",
                   0.0, "above", lambda res, sh: _ival(_paired(res, "dpo-b")["hit_minus_placebo_false_hit"])))
    C.append(Claim("slope:dpo-b", "1 credit", "dpo-b: the summed reward change rises with the gold change of the "
                   "edit more steeply than under the SFT-on-chosen null", "slope - null's slope", 0.0, "above",
                   lambda res, sh: _ival(res["credit"]["paired"]["dpo-b"]["slope_minus_sft_chosen"])))
    C.append(Claim("picture:dpo-b", "1 credit", "dpo-b: in the edited response itself (the paper's figure), the "
                   "swapped word is its most negative (or most positive) token more often than chance",
                   "share - chance (1/length)", 0.0, "above",
                   lambda res, sh: _ival(res["credit"]["models"]["dpo-b"]["picture_over_chance"])))
    C.append(Claim("picture-clean:dpo-b", "1 credit", "dpo-b: the swapped word is the extreme token of the edited "
                   "response in most edits (a clean heatmap, as the paper's figure)", "share of edits", 0.5, "above",
                   lambda res, sh: _ival(res["credit"]["models"]["dpo-b"]["picture_share"])))
    return C


def _search_claims(settings: dict) -> list[Claim]:
    """Finding 2: likelihood search on the policy (beam) against greedy decoding, and over-optimisation."""
    beams = sorted(settings["beams"])
    wide = beams[-1]
    small = 4 if 4 in beams and wide > 4 else beams[0]
    C: list[Claim] = []
    for lp in settings["length_penalties"]:
        C.append(Claim(f"beam-vs-greedy:lp{lp:g}", "2 search", f"beam {small} finds higher gold than greedy decoding "
                       f"of the same policy (length penalty {lp:g})", f"gold(beam {small}) - gold(greedy), paired",
                       0.0, "above", lambda res, sh, lp=lp: _ival(_beam(res, small, lp)["vs_greedy"]["gold"])))
        C.append(Claim(f"best-vs-greedy:lp{lp:g}", "2 search", f"the best beam width finds higher gold than greedy "
                       f"decoding (length penalty {lp:g})", "gold(best width) - gold(greedy), best chosen on the "
                       "other half", 0.0, "above", _best_beam_vs_greedy(lp)))
        for measure, what in (("gold", "gold"), ("gold_once", "gold with every word counted once")):
            C.append(Claim(f"overopt:{measure}:lp{lp:g}", "2 search", f"over-optimisation: beam {wide} scores lower "
                           f"{what} than the best width (length penalty {lp:g})",
                           f"{measure}(best width) - {measure}(beam {wide}), best chosen on the other half",
                           0.0, "above", _overopt(lp, measure, wide)))
        C.append(Claim(f"length:lp{lp:g}", "2 search", f"wider beams give longer outputs: beam {wide} against beam "
                       f"{small} (length penalty {lp:g})", f"length(beam {wide}) - length(beam {small}), paired",
                       0.0, "above", _length(lp, small, wide)))
    return C


def _dynamics_claims() -> list[Claim]:
    """Finding 3: where the chosen rewards go in training depends on the reference."""
    C: list[Claim] = []
    for r in ("dpo-a", "dpo-a-rt"):
        for side in ("chosen", "rejected"):
            C.append(Claim(f"fall:{r}:{side}", "3 dynamics", f"{r} (reference SFT-trained on chosen): held-out "
                           f"{side} rewards fall below 0 over the last quarter of training",
                           f"mean {side} reward, last quarter", 0.0, "below",
                           lambda res, sh, r=r, side=side: _ival(res["dynamics"]["runs"][r]["last_quarter"][side])))
    C.append(Claim("stay:dpo-b-rt", "3 dynamics", "dpo-b-rt (reference never trained on the off-distribution "
                   "chosen): held-out chosen rewards stay above 0 over the last quarter, as the paper reports",
                   "mean chosen reward, last quarter", 0.0, "above",
                   lambda res, sh: _ival(res["dynamics"]["runs"]["dpo-b-rt"]["last_quarter"]["chosen"])))
    C.append(Claim("stay-train:dpo-b-rt", "3 dynamics", "dpo-b-rt: chosen rewards of the training batches, each "
                   "measured before its update, stay above 0 over the last quarter", "mean over steps, last quarter",
                   0.0, "above",
                   lambda res, sh: _ival(res["dynamics"]["runs"]["dpo-b-rt"]["last_quarter_train"]["chosen"])))
    C.append(Claim("contrast:rt", "3 dynamics", "the reference decides: held-out chosen rewards end higher with the "
                   "SFT reference (b') than with the reference SFT-trained on chosen (a'), paired over pairs",
                   "chosen(b') - chosen(a'), last quarter", 0.0, "above",
                   lambda res, sh: _ival(res["dynamics"]["rt_chosen_b_minus_a"])))
    return C


def _kl(res: dict, run: str) -> Interval:
    c = res["dynamics"]["runs"][run]["kl_curve"][-1]
    beta = res["dpo"][run]["beta"]
    half = 1.96 * c["stderr"] / beta
    return c["kl_nats"], c["kl_nats"] - half, c["kl_nats"] + half


def claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim tested in every seed of the summary, with its verdict."""
    seeds = summary["per_seed"]
    runs = list(next(iter(seeds.values()))["dpo"])
    shared = dict(summary["shared"], n_boot=summary["settings"]["n_boot"])
    return [c.test(seeds, shared) for c in claim_list(summary["settings"], runs)]
