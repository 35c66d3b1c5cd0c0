"""The demo's results as Markdown, from a summary.json: the short claims table docs/results.md quotes, and the per-seed
detail of docs/demo/results.md (`python -m r2q.demo.markdown summary.json [--short]`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .methods import Method


def _ci(x) -> str:
    return "" if x is None else f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]"


def _md(columns: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _range(c: dict) -> str:
    r = c.get("range")
    return "" if not r else f"{r[0]:.3g}" if r[0] == r[1] else f"{r[0]:.3g} to {r[1]:.3g}"


def claims_short(summary: dict) -> str:
    """Each claim, its verdict across seeds and the range of the per-seed estimates."""
    return _md(["finding", "claim", "statistic", "verdict", "per-seed estimates"],
               [[c["finding"], c["statement"], c["statistic"], c["verdict"] + (f": {c['reason']}" if c.get("reason")
                                                                               else ""), _range(c)]
                for c in summary["claims"]])


def claims_per_seed(summary: dict) -> str:
    seeds = [str(s) for s in summary["seeds"]]

    def cell(v: dict) -> str:
        return "untestable" if v["status"] == "untestable" else \
            f"{v['estimate']:.3g} [{v['ci95'][0]:.3g}, {v['ci95'][1]:.3g}] {v['status']}"

    return _md(["claim", *[f"seed {s}" for s in seeds], "verdict"],
               [[c["id"], *[cell(c["per_seed"][s]) for s in seeds], c["verdict"]] for c in summary["claims"]])


def details(summary: dict) -> str:
    """Per seed: the DPO runs, credit, the main search table, equal compute and the dynamics."""
    sh = summary["shared"]
    parts = ["## Shared stages", f"Made once for every seed (data seed {summary['settings']['data_seed']}): "
             f"{', '.join(summary['shared_stages'])}.", "",
             _md(["prompt tokens", "SFT samples ending by EOS", "output tokens p10/p50/p90",
                  "prompt + output mean (sd)", "in the last 8 positions of an LM row"],
                 [[x["prompt_tokens"], _ci(x["eos"]), f"{x['output']['p10']:.0f}/{x['output']['p50']:.0f}/"
                   f"{x['output']['p90']:.0f}", f"{x['total_mean']:.1f} ({x['total_sd']:.1f})",
                   f"{x['total_in_last_8']:.2f}"] for x in sh["eos"]["by_prompt"]])]
    for s, res in summary["per_seed"].items():
        dyn = res["dynamics"]["runs"]
        parts += [f"## Seed {s}", "### DPO runs (held-out, final)",
                  _md(["run", "lr", "steps", "loss", "accuracy", "chosen", "rejected", "KL(pi_ref||pi) nats"],
                      [[n, f"{r['lr']:g}", r["steps"], _ci(dyn[n]["final"]["loss"]), _ci(dyn[n]["final"]["correct"]),
                        _ci(dyn[n]["final"]["chosen"]), _ci(dyn[n]["final"]["rejected"]),
                        f"{dyn[n]['kl_nats_final']:.2f}"] for n, r in res["dpo"].items()])]
        cr = res["credit"]
        parts += [f"### Credit ({cr['edits']} sentiment, {cr['placebo_edits']} placebo edits)",
                  _md(["model", "Spearman", "signed change", "hits", "picture", "placebo false hits"],
                      [[m["label"], _ci(m["spearman"]), _ci(m["signed_change"]), _ci(m["hit_share"]),
                        _ci(m["picture_share"]), _ci(m["placebo_false_hits"])] for m in cr["models"].values()])]
        for beta, block in res["search"]["by_beta"].items():
            parts += [f"### Search, beta {beta}", _search(block["rows"])]
        ec = res["search"]["equal_compute"]
        parts += [f"### Equal compute (first {ec['prompts']} prompts)", _search(ec["rows"])]
        parts += ["### Rewards over the last quarter of training",
                  _md(["run", "held-out chosen", "held-out rejected", "training-batch chosen"],
                      [[n, _ci(r["last_quarter"].get("chosen")) if len(r["last_quarter_steps"]) > 1 else "",
                        _ci(r["last_quarter"].get("rejected")) if len(r["last_quarter_steps"]) > 1 else "",
                        _ci(r["last_quarter_train"]["chosen"])] for n, r in dyn.items()]),
                  f"chosen(b') - chosen(a'), paired: {_ci(res['dynamics']['rt_chosen_b_minus_a'])}"]
    return "\n\n".join(parts)


def _search(rows: list[dict]) -> str:
    return _md(["method", "gold", "gold - greedy", "gold once - greedy", "length", "EOS", "distinct-2",
                "tokens/prompt"],
               [[Method(**r["method"]).label + (f" (width {r['width_chosen']})" if r.get("width_chosen") else ""),
                 _ci(r["gold"]), _ci(r["vs_greedy"].get("gold")), _ci(r["vs_greedy"].get("gold_once")),
                 f"{r['length']['mean']:.1f}", f"{r['eos_share']:.2f}", f"{r['distinct2']:.2f}",
                 f"{r['tokens_per_prompt']:.0f}" if r["tokens_per_prompt"] else ""] for r in rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("summary")
    ap.add_argument("--short", action="store_true", help="the claims table only")
    a = ap.parse_args(argv)
    s = json.loads(Path(a.summary).read_text())
    if a.short:
        print(claims_short(s))
        return
    print(f"# r2q demo results: profile {s['profile']}, seeds {', '.join(map(str, s['seeds']))}\n")
    print(f"From `{a.summary}`; the stages took {s['seconds_compute']:.0f} s of compute and "
          f"{s['seconds_wall_stages']:.0f} s of wall time from the start of the first to the end of the last.\n\n"
          "## Claims\n")
    print(claims_short(s) + "\n\n### Per seed\n\n" + claims_per_seed(s) + "\n\n" + details(s))


if __name__ == "__main__":
    main(sys.argv[1:])
