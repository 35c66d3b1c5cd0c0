"""Batched MCTS on the demo's task: wall time and gold at equal compute, by simulations per model call.

    python benchmarks/mcts_batch.py --demo r2q-demo --sims-per-call 1 4 8 --budget 1000 --threads 1

For each seed of a demo run (its dpo-b policy and SFT reference, the first 64 search prompts, as the demo's
equal-compute sweep), MCTS at `--budget` tokens per prompt decodes with each --sims-per-call value, in turn,
`--repeats` times (the wall time is the median; the outputs are deterministic). It reports seconds, forward passes and
tokens per prompt, and the gold of the outputs with a 95% interval, each value paired over prompts against one
simulation per call (the sequential search). A virtual loss makes the simulations of one call explore different
leaves, so S > 1 is a different search at the same compute, not the same one faster: its gold says what that costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="an r2q demo directory (seed-*/dpo-b, data/search_prompts.jsonl)")
    ap.add_argument("--sims-per-call", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()

    import numpy as np
    import torch

    from r2q.models import load_model, load_tokenizer
    from r2q.search import GenerateConfig, generate
    from r2q.stats import mean_ci, paired_diff_ci
    from r2q.tasks.imdb_sentiment import load_gold

    torch.set_num_threads(a.threads)
    demo = Path(a.demo)
    gold = load_gold(demo / "gold" / "gold.json")
    rows = [json.loads(ln) for ln in (demo / "data" / "search_prompts.jsonl").read_text().splitlines()][: a.prompts]
    prompts = [r["prompt"] for r in rows]
    out = []
    for seed_dir in sorted(demo.glob("seed-*")):
        run = json.loads((seed_dir / "dpo-b" / "stage.json").read_text())["result"]
        tok = load_tokenizer(run["model"])
        policy, ref = load_model(run["model"]).eval(), load_model(run["reference"]).eval()
        seed = int(seed_dir.name.split("-")[1])
        per = {}
        for _ in range(a.repeats):  # interleaved: every S once per repeat
            for s in a.sims_per_call:
                cfg = GenerateConfig(method="mcts", budget=a.budget, max_new_tokens=64, beta=run["beta"], seed=seed,
                                     batch_size=64, expand_top_k=8, rollout_len=8, sims_per_call=s)
                t0 = time.perf_counter()
                gens, compute = generate(policy, tok, prompts, cfg, ref=ref)
                dt = time.perf_counter() - t0
                g = np.asarray(gold([h.text for h in gens]), dtype=float)
                per.setdefault(s, {"seconds": [], "gold": g, "compute": compute})["seconds"].append(dt)
        base = per[a.sims_per_call[0]]
        for s, r in per.items():
            c = r["compute"]
            row = {"seed": seed, "sims_per_call": s, "seconds": statistics.median(r["seconds"]),
                   "simulations": c.get("width"), "forward_passes": c.get("forward_passes"),
                   "tokens_per_prompt": c["tokens_processed"] / len(prompts),
                   "gold": mean_ci(r["gold"], 2000), "speedup": statistics.median(base["seconds"]) /
                   statistics.median(r["seconds"])}
            if s != a.sims_per_call[0]:
                row["gold_vs_first"] = paired_diff_ci(r["gold"], base["gold"], 2000)
            out.append(row)
            d = row.get("gold_vs_first")
            print(f"seed {seed}  S={s:<2} {row['seconds']:6.1f} s  x{row['speedup']:.2f}  "
                  f"sims {row['simulations']}  passes {row['forward_passes']}  "
                  f"tokens/prompt {row['tokens_per_prompt']:.0f}  "
                  f"gold {row['gold'][0]:.2f} [{row['gold'][1]:.2f}, {row['gold'][2]:.2f}]"
                  + (f"  vs S={a.sims_per_call[0]}: {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]" if d else ""), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": out}, indent=1))


if __name__ == "__main__":
    main()
