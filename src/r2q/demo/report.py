"""The demo's report: self-contained HTML (the claims and their verdicts first), figures saved beside it, and the
claims table for the terminal. Everything shown comes from summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..paths import write_atomic
from ..views.report import esc, img, page, png_bytes, table
from .methods import SWEEP, Method

VERDICT_NOTE = ("A seed supports a claim when its whole 95% interval clears the threshold, contradicts it when the "
                "whole interval lies on the other side, and is inconclusive otherwise. Verdict across seeds: holds "
                "(every seed supports), fails (every seed contradicts), inconclusive (no seed decides), mixed "
                "(seeds disagree), untestable (with the reason).")


def ci(x) -> str:
    if x is None:
        return ""
    est, lo, hi = x
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def _seed_cell(v: dict) -> str:
    if v["status"] == "untestable":
        return "untestable"
    return f"{ci((v['estimate'], *v['ci95']))} {v['status']}"


def claims_rows(summary: dict) -> list[list[Any]]:
    seeds = [str(s) for s in summary["seeds"]]
    return [[c["finding"], c["statement"], c["statistic"], *[_seed_cell(c["per_seed"][s]) for s in seeds],
             c["verdict"] + (f" ({c['reason']})" if c.get("reason") else "")] for c in summary["claims"]]


def _rows(block: dict) -> list[tuple[Method, dict]]:
    return [(Method(**r["method"]), r) for r in block["rows"]]


def _errorbar(ax, xs, ivals, **kw) -> None:
    ax.errorbar(xs, [x[0] for x in ivals], yerr=[[x[0] - x[1] for x in ivals], [x[2] - x[0] for x in ivals]],
                capsize=2, **kw)


def fig_search(summary: dict) -> bytes:
    """Gold, degeneration-adjusted gold and length against beam width (0 = greedy), one line per seed and length
    penalty, for the main policy."""
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone

    fig = Figure(figsize=(13, 3.8))
    ax = fig.subplots(1, 3)
    lps = summary["settings"]["length_penalties"]
    for s, res in summary["per_seed"].items():
        rows = _rows(res["search"]["by_beta"][f"{summary['settings']['betas'][0]:g}"])
        greedy = next(r for m, r in rows if m.family == "greedy")
        for lp in lps:
            beams = sorted(((m.width, r) for m, r in rows if m.family == "beam" and m.length_penalty == lp),
                           key=lambda x: x[0])
            ks = [1] + [k for k, _ in beams]
            rs = [greedy] + [r for _, r in beams]
            lab = f"seed {s}, lp {lp:g}"
            _errorbar(ax[0], ks, [r["gold"] for r in rs], fmt="o-", label=lab)
            _errorbar(ax[1], ks, [r["gold_once"] for r in rs], fmt="o-", label=lab)
            ax[2].plot(ks, [r["length"]["mean"] for r in rs], "o-", label=lab)
    for a, yl in zip(ax, ("gold reward (95% CI)", "gold, every word counted once", "mean length (tokens)")):
        a.set(xscale="log", xlabel="beams (1 = greedy)", ylabel=yl)
        a.legend(fontsize=6)
    fig.tight_layout()
    return png_bytes(fig)


def fig_equal_compute(summary: dict) -> bytes:
    """Gold against tokens processed per prompt for every method with a width (a line per seed) and the greedy
    and temperature-1 baselines (points)."""
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    for i, (s, res) in enumerate(summary["per_seed"].items()):
        rows = _rows(res["search"]["equal_compute"])
        for c, fam in enumerate(SWEEP):
            pts = sorted((r["tokens_per_prompt"], r["gold"]) for m, r in rows if m.family == fam)
            _errorbar(ax, [x for x, _ in pts], [g for _, g in pts], fmt="o" + styles[i % 4], color=f"C{c}",
                      label=f"{fam} (seed {s})")
        for m, r in rows:
            if m.budget is None:
                _errorbar(ax, [r["tokens_per_prompt"]], [r["gold"]], fmt="s", color="k" if m.family == "greedy"
                          else "#888", label=f"{m.label} (seed {s})")
    ax.set(xscale="log", xlabel="tokens processed per prompt (every model)", ylabel="gold reward (95% CI)",
           title="search at equal compute")
    ax.legend(fontsize=5, ncol=3)
    fig.tight_layout()
    return png_bytes(fig)


def fig_dynamics(summary: dict) -> bytes:
    """Held-out (points) and pre-update training-batch (thin) chosen and rejected rewards, and -beta KL, of the runs
    of finding 3, in the first seed; the other seeds are in summary.json."""
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone

    names = ("dpo-a", "dpo-b", "dpo-shuffled", "dpo-a-rt", "dpo-b-rt", "dpo-shuffled-rt")
    seed, res = next(iter(summary["per_seed"].items()))
    dyn = res["dynamics"]["runs"]
    fig = Figure(figsize=(13, 6.5))
    axes = fig.subplots(2, 3)
    for ax, name in zip(axes.flat, names):
        run = dyn[name]
        for key, colour in (("chosen", "C0"), ("rejected", "C3")):
            tr = run["train"]
            ax.plot([m["step"] for m in tr], [m[f"rewards/{key}"] for m in tr], lw=0.6, alpha=0.5, color=colour)
            ev = run["eval"]
            ax.plot([m["step"] for m in ev], [m[f"rewards/{key}"] for m in ev], "o-", ms=3, color=colour,
                    label=f"{key} (held-out; thin: training batches)")
        kc = run["kl_curve"]
        ax.errorbar([c["step"] for c in kc], [c["expected_reward_under_ref"] for c in kc],
                    yerr=[c["stderr"] for c in kc], fmt="s--", ms=3, color="k", label="-beta KL(pi_ref||pi)")
        ax.axhline(0, color="#999", lw=0.8)
        ax.set(title=f"{name} (seed {seed})", xlabel="step", ylabel="beta log pi/pi_ref (summed)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return png_bytes(fig)


def _setup(summary: dict) -> list[str]:
    sh = summary["shared"]
    body = [f"<h2>Setup</h2><p>Shared by every seed (made once, data seed {summary['settings']['data_seed']}): "
            f"{', '.join(summary['shared_stages'])}. Every other stage runs once per seed.</p>"]
    body.append(table(["stage", "result"], [[k, ", ".join(f"{a}={v:.4g}" if isinstance(v, float) else f"{a}={v}"
                                                          for a, v in r.items() if isinstance(v, (int, float)))]
                                            for k, r in sh.items()]))
    eos = sh["eos"]
    body.append(f"<h3>Does the SFT policy end by content?</h3><p>Temperature-1 samples after the first k tokens of "
                f"{eos['prompts']} held-out passages (cap {eos['max_new_tokens']} new tokens; LM rows hold "
                f"{eos['lm_len']} tokens). Ended by position, prompt + output would sit at one length.</p>")
    body.append(table(["prompt tokens", "ends by EOS [CI]", "output p10/p50/p90", "prompt+output mean (sd)",
                       "prompt+output p25-p75", "share in the last 8 positions of an LM row"],
                      [[x["prompt_tokens"], ci(x["eos"]), f"{x['output']['p10']:.0f}/{x['output']['p50']:.0f}/"
                        f"{x['output']['p90']:.0f}", f"{x['total_mean']:.1f} ({x['total_sd']:.1f})",
                        f"{x['total']['p25']:.0f}-{x['total']['p75']:.0f}", x["total_in_last_8"]]
                       for x in eos["by_prompt"]]))
    for s, res in summary["per_seed"].items():
        dyn = res["dynamics"]["runs"]
        body.append(f"<h3>Seed {esc(s)}: DPO runs</h3>" + table(
            ["run", "lr", "beta", "steps", "held-out loss [CI]", "accuracy [CI]", "chosen [CI]", "rejected [CI]",
             "KL(pi_ref||pi), nats"],
            [[n, r["lr"], r["beta"], r["steps"], ci(dyn[n]["final"]["loss"]), ci(dyn[n]["final"]["correct"]),
              ci(dyn[n]["final"]["chosen"]), ci(dyn[n]["final"]["rejected"]), dyn[n]["kl_nats_final"]]
             for n, r in res["dpo"].items()]))
    return body


def _credit(summary: dict) -> list[str]:
    body = ["<h2>1. Credit assignment</h2><p>Spearman: per-token implicit reward against the gold word weight, "
            "over held-out pairs (resampling pairs). Edit test: a sentiment word swapped for one of the opposite "
            "sentiment; signed change = direction x reward change on the edited word; hit = the extreme change "
            "lands on the edited word; picture = in the edited response itself the edited word is its extreme "
            "token (chance: 1/length); placebo: a neutral word swapped for a neutral word. Edit intervals resample "
            "source texts.</p>"]
    for s, res in summary["per_seed"].items():
        cr = res["credit"]
        body.append(f"<h3>Seed {esc(s)} ({cr['edits']} sentiment and {cr['placebo_edits']} placebo edits of "
                    f"{cr['sources']} texts)</h3>")
        body.append(table(["model", "Spearman [CI]", "signed change [CI]", "hits [CI]", "picture [CI]",
                           "picture - chance [CI]", "placebo false hits [CI]", "slope vs gold change [CI]",
                           "most rewarded tokens"],
                          [[m["label"], ci(m["spearman"]), ci(m["signed_change"]), ci(m["hit_share"]),
                            ci(m["picture_share"]), ci(m["picture_over_chance"]), ci(m["placebo_false_hits"]),
                            ci(m["slope_vs_gold"]), " ".join(t for t, _, _ in m["top_positive"][:8])]
                           for m in cr["models"].values()]))
        body.append(table(["DPO run", "Spearman - best null", "signed - untrained", "signed - shuffled",
                           "signed - SFT-on-chosen", "slope - SFT-on-chosen", "hits - placebo false hits"],
                          [[k, ci(v["spearman_minus_best_null"]), *[ci(v["signed_minus_null"][n]) for n in
                                                                    ("untrained", "shuffled", "sft-chosen")],
                            ci(v["slope_minus_sft_chosen"]), ci(v["hit_minus_placebo_false_hit"])]
                           for k, v in cr["paired"].items()]))
    return body


def _search_table(rows: list[tuple[Method, dict]]) -> str:
    return table(["method", "gold [CI]", "gold - greedy [CI]", "gold once - greedy [CI]", "gold - T=1 sample [CI]",
                  "length mean (p10-p90)", "ends in EOS", "distinct-2", "judge NLL/token [CI]", "tokens/prompt"],
                 [[m.label + (f" (width {r['width_chosen']})" if r.get("width_chosen") else ""), ci(r["gold"]),
                   ci(r["vs_greedy"].get("gold")), ci(r["vs_greedy"].get("gold_once")), ci(r["vs_sample"].get("gold")),
                   f"{r['length']['mean']:.1f} ({r['length']['p10']:.0f}-{r['length']['p90']:.0f})", r["eos_share"],
                   r["distinct2"], ci(r["judge_nll"]), r["tokens_per_prompt"] or ""] for m, r in rows])


def _search(out: Path, summary: dict) -> list[str]:
    body = ["<h2>2. Search</h2><p>Held-out prompts decoded by the DPO (b) policy with its reference. Every "
            "difference is paired over prompts. Gold once: the gold classifier with every word counted once, so "
            "repeating a phrase cannot raise it. Judge NLL: per-token NLL under a separately trained LM. "
            "Tokens/prompt: token positions processed by every model.</p>"]
    for s, res in summary["per_seed"].items():
        for beta, block in res["search"]["by_beta"].items():
            body.append(f"<h3>Seed {esc(s)}, beta {esc(beta)}</h3>" + _search_table(_rows(block)))
        ec = res["search"]["equal_compute"]
        body.append(f"<h4>Seed {esc(s)}: equal compute (budgets {', '.join(map(str, ec['budgets']))} tokens "
                    f"per prompt, the first {ec['prompts']} prompts; --budget sets each method's width)</h4>"
                    + _search_table(_rows(ec)))
    for name, fig, alt in (("search.png", fig_search(summary), "gold and length against beam width"),
                           ("equal_compute.png", fig_equal_compute(summary), "gold against tokens processed")):
        (out / name).write_bytes(fig)
        body.append(img(fig, alt))
    return body


def _dynamics(out: Path, summary: dict) -> list[str]:
    body = ["<h2>3. Implicit rewards during training</h2><p>a: reference = SFT on the chosen side; b: reference = "
            "the SFT policy; -rt: human Rotten Tomatoes snippets, off the SFT policy's distribution; shuffled: "
            "shuffled labels (a null). Last quarter: per pair, averaged over the checkpoints of the last quarter of "
            "training; training batches: the trainer's pre-update measurement of each step.</p>"]
    for s, res in summary["per_seed"].items():
        dyn = res["dynamics"]
        body.append(f"<h3>Seed {esc(s)}</h3>" + table(
            ["run", "held-out chosen, last quarter [CI]", "held-out rejected [CI]", "training-batch chosen [CI]",
             "training-batch rejected [CI]"],
            [[n, ci(r["last_quarter"]["chosen"]), ci(r["last_quarter"]["rejected"]),
              ci(r["last_quarter_train"]["chosen"]), ci(r["last_quarter_train"]["rejected"])]
             for n, r in dyn["runs"].items()]))
        body.append(f"<p>chosen(b') - chosen(a'), paired over held-out pairs: {ci(dyn['rt_chosen_b_minus_a'])}</p>")
    fig = fig_dynamics(summary)
    (out / "dynamics.png").write_bytes(fig)
    body.append(img(fig, "implicit rewards during training"))
    return body


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    seeds = ", ".join(map(str, summary["seeds"]))
    body = [f"<p class=note>profile <code>{esc(summary['profile'])}</code>, seeds {esc(seeds)}; stages took "
            f"{summary['seconds_compute']:.0f}s of compute, {summary['seconds_wall_stages']:.0f}s of wall time from "
            "the first to the last, when they ran. Every number below is in summary.json, with the "
            f"commit and code hash of the run that computed each stage. {esc(VERDICT_NOTE)}</p>"]
    body.append("<h2>Claims</h2>" + table(["finding", "statement", "statistic",
                                           *[f"seed {s}" for s in summary["seeds"]], "verdict"],
                                          claims_rows(summary)))
    body += _setup(summary) + _credit(summary) + _search(out, summary) + _dynamics(out, summary)
    return write_atomic(out / "report.html", page("r2q demo: From r to Q* on imdb-sentiment", "".join(body)))


def terminal_table(summary: dict):
    """The claims for the terminal: id, each seed's estimate and status, the verdict (statements: report.html)."""
    from rich.table import Table

    seeds = [str(s) for s in summary["seeds"]]
    t = Table(title=f"r2q demo: claims across seeds {', '.join(seeds)} (statements in report.html)")
    for c in ("finding", "claim", *[f"seed {s}" for s in seeds], "verdict"):
        t.add_column(c)
    mark = {"supports": "+", "contradicts": "-", "inconclusive": "?"}
    for c in summary["claims"]:
        cells = [f"{v['estimate']:.3g} {mark[v['status']]}" if "estimate" in v else "untestable"
                 for v in (c["per_seed"][s] for s in seeds)]
        t.add_row(c["finding"], c["id"], *cells, c["verdict"])
    return t
