"""`r2q theory`: run the exact checks, print their tables with rich, write report.html, summary.json and PNGs.

The report is one self-contained HTML file (figures embedded as base64 PNG, every piece of text escaped).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import check_seed
from ..paths import RunLock, write_atomic
from ..views.report import esc, img, png_bytes, table
from .checks import (
    CheckResult,
    check_argmax,
    check_arithmetic,
    check_falling,
    check_optimum,
    check_sampled,
    check_transformer,
    default_mdp,
)
from .config import TheoryConfig  # noqa: F401  (re-exported: `from r2q.theory.report import TheoryConfig`)
from .outdir import check_theory_out


def run(out_dir: str | Path, seed: int = 0, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every check on the seeded instance and write DIR/report.html, DIR/summary.json and DIR/*.png. DIR must
    be new, empty or an earlier theory report (its files are replaced, each atomically).

    quick=True runs smaller versions (one instance, fewer pairs and steps) in about half a minute.
    Returns the summary dict (also written to summary.json); summary["passed"] says whether every check held.
    """
    from rich.console import Console

    check_seed(seed, "--seed")
    out = check_theory_out(out_dir, FIGURES)
    with RunLock(out):  # two runs on one DIR would pair one's figures with the other's summary
        return _run(out, seed, quick, Console(quiet=not progress))


def _run(out: Path, seed: int, quick: bool, console) -> dict[str, Any]:
    from rich.markup import escape

    t0 = time.perf_counter()
    mdp = default_mdp(seed)
    plan = [
        ("optimum", lambda: check_optimum([mdp] if quick else [mdp, default_mdp(seed + 1), default_mdp(seed, 5)])),
        ("sampled", lambda: check_sampled(mdp, (100, 1000, 10000) if quick else (100, 1000, 10000, 100000),
                                          repeats=1 if quick else 3, seed=seed)),
        ("transformer", lambda: check_transformer(mdp, steps=300 if quick else 800, seed=seed)),
        ("argmax", lambda: check_argmax(mdp)),
        ("falling", lambda: check_falling(mdp, steps=150 if quick else 300)),
        ("arithmetic", lambda: check_arithmetic(seed=seed)),
    ]
    results: list[CheckResult] = []
    threads = torch.get_num_threads()
    # every tensor here is tiny: extra threads only add overhead (and, on a busy machine, stalls)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            for name, fn in plan:
                with console.status(f"theory: {name}"):
                    torch.manual_seed(seed)
                    res = fn()
                results.append(res)
                console.print(rich_table(res))
    finally:
        torch.set_num_threads(threads)
    figures = {r.key: FIGURES[r.key](r) for r in results if r.key in FIGURES}
    for key, png in figures.items():
        write_atomic(out / f"{key}.png", png)
    summary = {
        "seed": seed, "quick": quick, "passed": all(r.passed for r in results),
        "seconds": time.perf_counter() - t0,
        "checks": {r.key: {"title": r.title, "claim": r.claim, "passed": r.passed, "seconds": r.seconds,
                           "numbers": r.numbers} for r in results},
    }
    summary = _jsonable(summary)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "report.html", render_html(results, figures, summary))
    verdict = "[green]all checks hold[/]" if summary["passed"] else "[red]some checks failed[/]"
    console.print(f"{verdict} in {summary['seconds']:.1f}s; report: {escape(str(out / 'report.html'))}")
    return summary


def fmt(x: Any) -> str:
    """Short text for a table cell: 4 decimals, scientific for tiny or huge values, yes/no for booleans."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x == 0 or not math.isfinite(x):
            return str(x)
        return f"{x:.2e}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.4f}"
    return str(x)


def rich_table(res: CheckResult):
    from rich.markup import escape
    from rich.table import Table

    mark = "[green]PASS[/]" if res.passed else "[red]FAIL[/]"
    table = Table(title=f"{mark} {escape(res.title)} ({res.seconds:.1f}s)", caption=escape(res.claim),
                  title_justify="left")
    for c in res.columns:
        table.add_column(escape(c), overflow="fold")
    for row in res.rows:
        table.add_row(*(escape(fmt(v)) for v in row))
    return table


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------- figures


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * ncols, 3.8))
    return fig, fig.subplots(1, ncols) if ncols > 1 else fig.subplots()


def fig_optimum(res: CheckResult) -> bytes:
    s = res.series
    fig, (a, b) = _figure(2)
    a.scatter(s["shaped"], s["implicit"], s=14, label="vs r + V*(s') - V*(s)")
    a.scatter(s["raw"], s["implicit"], s=10, alpha=0.5, color="gray", label="vs raw r(s,a)")
    lo, hi = min(s["implicit"] + s["raw"]), max(s["implicit"] + s["raw"])
    a.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    a.set(xlabel="true reward", ylabel="beta log pi_DPO/pi_ref", title="per-token implicit reward")
    a.legend(fontsize=8)
    b.loglog(s["p_star"], s["p_dpo"], "o", ms=4, label="DPO optimum")
    b.loglog(s["p_star"], s["p_ref"], "x", ms=4, alpha=0.6, color="gray", label="reference")
    lo, hi = min(s["p_star"] + s["p_ref"]), max(s["p_star"] + s["p_ref"])
    b.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    b.set(xlabel="pi*(y)", ylabel="pi(y)", title="sequence probabilities")
    b.legend(fontsize=8)
    return png_bytes(fig)


def fig_sampled(res: CheckResult) -> bytes:
    s = res.series
    fig, (a, b) = _figure(2)
    a.semilogx(s["ns"], s["corr"], "o-", label="with shaped r + V*(s') - V*(s)")
    a.semilogx(s["ns"], s["corr_raw"], "s--", color="gray", label="with raw r")
    a.set(xlabel="preference pairs N", ylabel="weighted correlation", title="recovered token rewards")
    a.legend(fontsize=8)
    b.loglog(s["ns"], s["rmse"], "o-", label="token RMSE (shaped)")
    b.loglog(s["ns"], s["tv"], "s-", label="TV(pi, pi*)")
    b.set(xlabel="preference pairs N", title="error")
    b.legend(fontsize=8)
    return png_bytes(fig)


def fig_transformer(res: CheckResult) -> bytes:
    steps, tv = zip(*res.series["curve"])
    fig, a = _figure()
    a.semilogy(steps, tv)
    a.set(xlabel="DPO step", ylabel="TV(pi_theta, pi*)", title="tiny transformer, infinite preference data")
    return png_bytes(fig)


def fig_argmax(res: CheckResult) -> bytes:
    s = res.series
    fig, a = _figure()
    a.scatter(s["true_score"], s["log_star"], s=12)
    i = max(range(len(s["log_star"])), key=s["log_star"].__getitem__)
    a.scatter([s["true_score"][i]], [s["log_star"][i]], s=80, facecolors="none", edgecolors="r", label="argmax")
    a.set(xlabel="R(y) + beta log pi_ref(y)", ylabel="beta log pi*(y)", title="prompt 0: a line of slope 1")
    a.legend(fontsize=8)
    return png_bytes(fig)


def fig_falling(res: CheckResult) -> bytes:
    runs = res.series["runs"]
    fig, axes = _figure(len(runs))
    for a, (name, o) in zip(axes, runs.items()):
        a.plot(o["chosen"], label="E R_theta(chosen)")
        a.plot(o["rejected"], label="E R_theta(rejected)")
        a.plot(o["e_ref"], lw=3, alpha=0.4, label="E_{pi_ref} R_theta")
        a.plot(o["neg_beta_kl"], "k:", label="-beta KL(pi_ref||pi)")
        a.axhline(0, color="gray", lw=0.6)
        a.set(xlabel="DPO step", ylabel="implicit reward", title=name)
        a.legend(fontsize=7)
    return png_bytes(fig)


FIGURES = {"optimum": fig_optimum, "sampled": fig_sampled, "transformer": fig_transformer, "argmax": fig_argmax,
           "falling": fig_falling}


# ---------------------------------------------------------------------------------------------- html

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}td.t{white-space:pre;font-family:monospace}
.pass{color:#0a0;font-weight:bold}.fail{color:#c00;font-weight:bold}.claim{font-family:monospace;background:#f7f7f7;
padding:.4em}.err{background:#fbb;outline:1px solid #c00}img{max-width:100%}section{margin-bottom:2.5em}"""


NOTES = {
    "optimum": "Preferences with infinite data: every pair of completions of a prompt, weighted by "
               "pi_ref(y1) pi_ref(y2), labelled by Bradley-Terry on the true return R(y) = sum_t r(s_t, a_t). A "
               "tabular policy (a logit per state and token) minimises r2q's DPO loss by Newton's method. Its "
               "per-token implicit reward equals the true reward shaped by the soft value V*, not the raw reward "
               "(last columns); VI vs enumeration compares soft value iteration with pi_ref(y) exp(R(y)/beta) / Z.",
    "sampled": "N pairs drawn from pi_ref with Bernoulli Bradley-Terry labels; the tabular policy is fitted with a "
               "weak Gaussian prior at the reference (without it, pairs that always go one way push the optimum to "
               "infinity). Correlations and RMSE are over (state, token) pairs weighted by how often pi_ref takes "
               "them, against the shaped reward r + V*(s') - V*(s) and, for contrast, the raw r.",
    "transformer": "The reference is a random tiny Llama over the tree's vocabulary, the policy starts as its copy; "
                   "the loss goes through build_batch, completion_logps, implicit_rewards, sequence_rewards and "
                   "dpo_loss, as in the trainer; pi* is computed for that reference by soft value iteration.",
    "argmax": "Eq. 13: maximising sum_t r + beta log pi_ref over completions is maximising log pi*. The exhaustive "
              "searches are exact; the greedy rows show what check_search reports for a search that may miss. "
              "check_search(search, tree, seq_logp) is the hook for r2q.search's beam search and MCTS.",
    "falling": "A DPO run (Adam on the tabular logits, infinite pairs). Left: the pairs come from pi_ref; "
               "right: from pi* (better than the reference, as when the reference was never fitted to the data). "
               "The expected implicit reward under pi_ref is -beta KL(pi_ref || pi) at every step (identity, "
               "computed by enumeration vs by the chain rule over states); chosen and rejected are expectations "
               "over the pair distribution.",
    "arithmetic": "Rows of r2q.tasks.arithmetic (used by the credit tests): the highlighted character is "
                  "error_char, where chosen and rejected first differ; before it both are correct.",
}


def _marked(text: str, i: int) -> str:
    """The text with character i highlighted (escaped)."""
    if not 0 <= i < len(text):
        return esc(text)
    return esc(text[:i]) + f"<span class='err'>{esc(text[i])}</span>" + esc(text[i + 1:])


def _arithmetic_examples(res: CheckResult) -> str:
    rows = "".join(
        f"<tr><td class='t'>{esc(r['kind'])}</td><td class='t'>{esc(r['prompt'])}</td>"
        f"<td class='t'>{_marked(r['chosen'], r['error_char'])}</td>"
        f"<td class='t'>{_marked(r['rejected'], r['error_char'])}</td><td>{r['error_char']}</td></tr>"
        for r in res.series["examples"])
    head = "".join(f"<th>{esc(c)}</th>" for c in res.columns)
    return f"<table><tr>{head}</tr>{rows}</table>"


def render_html(results: list[CheckResult], figures: dict[str, bytes], summary: dict[str, Any]) -> str:
    """The whole report as one HTML string."""
    def verdict(ok: bool) -> str:
        return "<span class='pass'>PASS</span>" if ok else "<span class='fail'>FAIL</span>"

    overview = "".join(f"<tr><td class='t'><a href='#{esc(r.key)}'>{esc(r.title)}</a></td>"
                       f"<td>{verdict(r.passed)}</td><td>{r.seconds:.1f}s</td></tr>" for r in results)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>r2q theory: exact checks</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>r2q theory: exact checks on a token-level MDP</h1>",
        "<p>A tree MDP small enough to enumerate (3 tokens + EOS, 2 prompts, float64): the reference is a table "
        "(or a tiny transformer), the true reward is per token, and soft value iteration gives Q*, V*, pi* exactly. "
        "DPO runs through r2q's own implicit_rewards, sequence_rewards and dpo_loss.</p>",
        f"<p>seed {summary['seed']}, {'quick' if summary['quick'] else 'full'} run, "
        f"{summary['seconds']:.1f}s, {verdict(summary['passed'])}</p>",
        f"<table><tr><th>check</th><th>result</th><th>time</th></tr>{overview}</table>",
    ]
    for r in results:
        parts.append(f"<section id='{esc(r.key)}'><h2>{esc(r.title)} {verdict(r.passed)}</h2>")
        parts.append(f"<p class='claim'>{esc(r.claim)}</p>")
        if r.key in NOTES:
            parts.append(f"<p>{esc(NOTES[r.key])}</p>")
        parts.append(_arithmetic_examples(r) if r.key == "arithmetic" else table(r.columns, r.rows, fmt))
        if r.key in figures:
            parts.append(img(figures[r.key], r.key))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
