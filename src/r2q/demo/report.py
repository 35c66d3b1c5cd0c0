"""The demo's report: self-contained HTML (claims first), figures saved beside it, key tables for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..views.report import esc, img, page, png_bytes, table


def _ci(x) -> str:
    if x is None:
        return ""
    est, lo, hi = x
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def _beam_rows(rows: list[dict], lp: float) -> tuple[list[int], list[dict]]:
    """The '1 beam' (sampling) row and the beam rows of one length penalty, by width."""
    out = [(1, next(r for r in rows if r["method"].startswith("sample")))]
    out += [(int(r["method"].split()[1]), r) for r in rows if r["method"].startswith("beam ")
            and r["method"].endswith(f"lp {lp:g}")]
    out.sort(key=lambda x: x[0])
    return [k for k, _ in out], [r for _, r in out]


def fig_search(search: dict, lps: tuple[float, ...]) -> bytes:
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone

    fig = Figure(figsize=(13, 3.6))
    ax = fig.subplots(1, 3)
    for beta, block in search["by_beta"].items():
        for lp in lps:
            ks, rows = _beam_rows(block["rows"], lp)
            lab = f"beta {beta}, length penalty {lp:g}"
            wr = [r.get("win_rate_vs_sample", (0.5, 0.5, 0.5)) for r in rows]
            ax[0].errorbar(ks, [w[0] for w in wr], yerr=[[w[0] - w[1] for w in wr], [w[2] - w[0] for w in wr]],
                           fmt="o-", capsize=2, label=lab)
            g = [r["gold"] for r in rows]
            ax[1].errorbar(ks, [x[0] for x in g], yerr=[[x[0] - x[1] for x in g], [x[2] - x[0] for x in g]],
                           fmt="o-", capsize=2, label=lab)
            ax[2].plot(ks, [r["length"] for r in rows], "o-", label=lab)
    for a, yl in zip(ax, ("win rate vs T=1 samples (95% CI)", "gold reward (95% CI)", "mean length (tokens)")):
        a.set(xscale="log", xlabel="beams (1 = temperature-1 sampling)", ylabel=yl)
        a.set_xticks(ks, [str(k) for k in ks])  # widths, not powers of ten
        a.minorticks_off()
        a.legend(fontsize=7)
    ax[0].axhline(0.5, color="#999", lw=0.8)
    fig.tight_layout()
    return png_bytes(fig)


FIXED_COST = ("sample", "greedy", "guided")  # methods without a width: one point each on the equal-compute figure


def _sweep_main(search: dict) -> tuple[list[dict], dict]:
    """The main search table of the run the equal-compute sweep used, and its greedy row."""
    run = search["equal_compute"]["run"]
    rows = next(b for b in search["by_beta"].values() if b["run"] == run)["rows"]
    return rows, next(r for r in rows if r["method"] == "greedy")


def fig_equal_compute(search: dict) -> bytes:
    """Gold reward (95% CI) against tokens processed per prompt: each method with a width at every budget, and
    the fixed-cost methods of the main table as single points."""
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone
    from matplotlib.ticker import FuncFormatter

    ec = search["equal_compute"]
    main_rows, greedy = _sweep_main(search)
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    families = dict.fromkeys(r["family"] for r in ec["rows"])
    for fam in families:
        rows = sorted((r for r in ec["rows"] if r["family"] == fam), key=lambda r: r["tokens_per_prompt"])
        g = [r["gold"] for r in rows]
        ax.errorbar([r["tokens_per_prompt"] for r in rows], [x[0] for x in g],
                    yerr=[[x[0] - x[1] for x in g], [x[2] - x[0] for x in g]], fmt="o-", capsize=2, label=fam)
    for r in main_rows:
        if r["method"].startswith(FIXED_COST):
            x = r["gold"]
            ax.errorbar([r["tokens_per_prompt"]], [x[0]], yerr=[[x[0] - x[1]], [x[2] - x[0]]], fmt="s", capsize=2,
                        label=r["method"])
    for b in ec["budgets"]:
        ax.axvline(b, color="#ccc", lw=0.8, zorder=0)
    ax.set(xscale="log", xlabel="tokens processed per prompt (every model; grey: the budgets)",
           ylabel="gold reward (95% CI)", title="search at equal compute")
    ax.set_xticks(sorted({*ec["budgets"], round(greedy["tokens_per_prompt"])}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return png_bytes(fig)


def fig_dynamics(dyn: dict) -> bytes:
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone

    fig = Figure(figsize=(4.6 * len(dyn), 3.8))
    axes = fig.subplots(1, len(dyn), squeeze=False)
    for ax, (name, run) in zip(axes[0], dyn.items()):
        ev = run["eval"]
        steps = [m["step"] for m in ev]
        for key, label in (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                           ("rewards/margin", "margin")):
            ax.plot(steps, [m[key] for m in ev], "o-", ms=3, label=f"{label} (held-out)")
        kc = run["kl_curve"]
        ax.errorbar([c["step"] for c in kc], [c["expected_reward_under_ref"] for c in kc],
                    yerr=[c["stderr"] for c in kc], fmt="s--", ms=3, color="k", label="-beta KL(pi_ref||pi)")
        ax.axhline(0, color="#999", lw=0.8)
        ax.set(title=name, xlabel="step", ylabel="beta log pi/pi_ref (summed)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def fig_training(dyn: dict) -> bytes:
    from matplotlib.figure import Figure  # Agg-rendered; pyplot and the global backend are left alone

    fig = Figure(figsize=(12, 3.6))
    ax = fig.subplots(1, 2)
    for name, run in dyn.items():
        tr, ev = run["train"], run["eval"]
        line = ax[0].plot([m["step"] for m in tr], [m["loss"] for m in tr], lw=0.6, alpha=0.5)[0]
        ax[0].plot([m["step"] for m in ev], [m["loss"] for m in ev], "o-", ms=3, color=line.get_color(),
                   label=f"{name} held-out")
        ax[1].plot([m["step"] for m in tr], [m["rewards/accuracy"] for m in tr], lw=0.6, alpha=0.5,
                   color=line.get_color())
        ax[1].plot([m["step"] for m in ev], [m["rewards/accuracy"] for m in ev], "o-", ms=3,
                   color=line.get_color(), label=f"{name} held-out")
    ax[0].axhline(0.6931, color="#999", lw=0.8)
    ax[1].axhline(0.65, color="#999", lw=0.8)
    ax[0].set(xlabel="step", ylabel="DPO loss (thin: train batches)")
    ax[1].set(xlabel="step", ylabel="pair accuracy (thin: train batches)")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def _claims_table(claims: list[dict]) -> str:
    return table(["finding", "statement", "statistic", "estimate [95% CI]", "holds"],
                 [[c["finding"], c["statement"], c["statistic"], _ci((c["estimate"], *c["ci95"])),
                   "yes" if c["holds"] else "NO"] for c in claims])


def _search_table(rows: list[dict]) -> str:
    return table(["method", "gold [CI]", "gold - greedy [CI]", "gold - sample [CI]", "win rate vs sample [CI]",
                  "length", "ends in EOS", "distinct-2", "judge NLL/token [CI]", "log pi", "log pi/pi_ref",
                  "tokens/prompt"],
                 [[r["method"], _ci(r["gold"]), _ci(r.get("gold_vs_greedy")), _ci(r.get("gold_vs_sample")),
                   _ci(r.get("win_rate_vs_sample")),
                   r["length"], r["eos_share"], r["distinct2"], _ci(r["judge_nll"]), r["logp"], r["log_ratio"],
                   r.get("tokens_per_prompt", "")] for r in rows])


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    p = summary["settings"]
    cr, se, dy = summary["credit"], summary["search"], summary["dynamics"]
    body = [f"<p class=note>profile <code>{esc(summary['profile'])}</code>, seed {summary['seed']}; stages took "
            f"{summary['seconds_compute']:.0f}s when they ran. Every number below is in summary.json; intervals are "
            "95% percentile bootstraps over pairs, prompts or edits.</p>"]
    body.append("<h2>Claims</h2>" + _claims_table(summary["claims"]))
    body.append("<h2>Setup</h2>" + table(["stage", "result", "seconds"], [
        [k, ", ".join(f"{a}={v:.4g}" if isinstance(v, float) else f"{a}={v}" for a, v in r.items()
                      if isinstance(v, (int, float))), summary["timings"].get(k, 0.0)]
        for k, r in summary["stages"].items()]))
    body.append("<h3>DPO runs on held-out pairs</h3>" + table(
        ["run", "loss [CI]", "accuracy [CI]", "chosen reward [CI]", "rejected reward [CI]", "margin [CI]", "pairs"],
        [[k, _ci(h["loss"]), _ci(h["accuracy"]), _ci(h["chosen_reward"]), _ci(h["rejected_reward"]),
          _ci(h["margin"]), h["pairs"]] for k, h in cr["heldout"].items()]))
    fig = fig_training(dy)
    (out / "training.png").write_bytes(fig)
    body.append(img(fig, "train and held-out DPO loss and accuracy"))
    body.append("<h2>1. Credit assignment</h2><p>Spearman correlation, over the tokens of held-out chosen and "
                "rejected completions that lie in a word the gold classifier knows, between the per-token implicit "
                "reward and the gold word weight (coefficient x idf); the interval resamples pairs. Edit test: a "
                f"strongly positive word swapped for a strongly negative one or the reverse ({cr['edits']} edits of "
                "held-out text); a hit is an edit whose most negative (or most positive) reward change is on the "
                "edited token. Tokens: seen at least 20 times.</p>")
    m = cr["models"]
    body.append(table(["model", "Spearman [CI]", "tokens", "edit hits [CI]", "pos->neg: mean change at edit [CI]",
                       "neg->pos: mean change at edit [CI]", "most rewarded tokens", "most penalised tokens"],
                      [[v["label"], _ci(v["spearman"]), v["tokens"], _ci(v["edit_test"].get("hit_share")),
                        _ci((v["edit_test"].get("pos_to_neg") or {}).get("mean_delta_at_edit")),
                        _ci((v["edit_test"].get("neg_to_pos") or {}).get("mean_delta_at_edit")),
                        " ".join(t for t, _, _ in v["top_positive"][:8]),
                        " ".join(t for t, _, _ in v["top_negative"][:8])] for v in m.values()]))
    png = out / "credit" / "credit.png"
    if png.exists():
        body.append(img(png.read_bytes(), "per-token rewards of example pairs"))
    body.append('<p>All held-out pairs, coloured token by token: <a href="credit/credit.html">credit/credit.html</a>.'
                "</p>")
    body.append(f"<h2>2. Search</h2><p>{se['prompts']} held-out prompts, up to {se['max_new_tokens']} new tokens; "
                "DPO (b) with its reference. Win rate: gold beats the same policy's temperature-1 sample on the same "
                "prompt (ties half). Judge NLL: per-token negative log-likelihood under a separately trained LM "
                "(fluency; lower is more fluent). Tokens/prompt: token positions processed by every model.</p>")
    for beta, block in se["by_beta"].items():
        body.append(f"<h3>beta {esc(beta)}</h3>" + _search_table(block["rows"]))
    fig = fig_search(se, tuple(p["length_penalties"]))
    (out / "search.png").write_bytes(fig)
    body.append(img(fig, "win rate, gold reward and length against the number of beams"))
    if "equal_compute" in se:
        ec = se["equal_compute"]
        body.append("<h3>Equal compute</h3><p>Every method with a width (samples, beams, simulations) run with "
                    f"<code>--budget</code> at {', '.join(str(b) for b in ec['budgets'])} tokens processed per "
                    "prompt: the width is the largest whose cost fits when no output ends early, so the spend "
                    "(tokens/prompt) is at most the budget. chunk-beam: 2 samples per beam, chunks of 8 tokens, "
                    "the SFT model proposing; MCTS: 8 children per node, rollouts capped at 8 tokens.</p>")
        body.append(table(["method", "budget", "width", "tokens/prompt", "gold [CI]", "gold - greedy [CI]",
                           "gold - sample [CI]", "length", "ends in EOS", "judge NLL/token [CI]"],
                          [[r["family"], r["budget"], r["width"], r["tokens_per_prompt"], _ci(r["gold"]),
                            _ci(r.get("gold_vs_greedy")), _ci(r.get("gold_vs_sample")), r["length"],
                            r["eos_share"], _ci(r["judge_nll"])] for r in ec["rows"]]))
        main_rows, greedy = _sweep_main(se)
        none_better = [f"{r['method']} ({r['tokens_per_prompt'] / greedy['tokens_per_prompt']:.1f}x greedy's tokens: "
                       f"{_ci(r['gold_vs_greedy'])})" for r in main_rows + ec["rows"]
                       if "gold_vs_greedy" in r and r["gold_vs_greedy"][1] <= 0]
        body.append("<p><b>Searches that find nothing better than greedy decoding</b> (the interval of gold - "
                    "greedy's gold, paired by prompt, reaches 0 or below): "
                    + (esc("; ".join(none_better)) if none_better else "none") + ".</p>")
        fig = fig_equal_compute(se)
        (out / "equal_compute.png").write_bytes(fig)
        body.append(img(fig, "gold reward against tokens processed per prompt"))
    body.append("<h2>3. Implicit rewards during training</h2><p>Held-out chosen and rejected rewards at every "
                "evaluation (step 0 measured before the first update). a: reference = SFT on the chosen side; "
                "b: reference = the SFT policy; -rt: human Rotten Tomatoes snippets, off the SFT policy's "
                "distribution. Dashed: E_{y~pi_ref}[beta log pi/pi_ref] = -beta KL(pi_ref||pi), from "
                f"{p['n_ref_samples']} reference samples per checkpoint.</p>")
    fig = fig_dynamics(dy)
    (out / "dynamics.png").write_bytes(fig)
    body.append(img(fig, "implicit rewards during training"))
    path = out / "report.html"
    path.write_text(page("r2q demo: From r to Q* on imdb-sentiment", "".join(body)))
    return path


def key_tables(summary: dict) -> list:
    from rich.table import Table

    t = Table(title="r2q demo: claims (95% bootstrap intervals)")
    for c in ("finding", "statement", "estimate [95% CI]", "holds"):
        t.add_column(c)
    for c in summary["claims"]:
        t.add_row(c["finding"], c["statement"], _ci((c["estimate"], *c["ci95"])), "yes" if c["holds"] else "NO")
    return [t]
