"""Peak memory and step time of one DPO micro-batch against row length T, for the three row layouts.

    python benchmarks/layouts.py [--lengths 512 1024 2048 4096 8192] [--pairs 8] [--threads 2] [--out layouts.json]

The batch: `pairs` preference pairs whose lengths are spread evenly over [T/4, T] tokens (prompt half of it, chosen
and rejected a quarter each), as pairs of realistically varied length are. Layouts:
- plain: one right-padded row per prompt + completion (2 rows per pair), the layout TRL uses;
- shared: one row per pair, [prompt, chosen, rejected], the prompt run once (`--share-prefix`, r2q's default);
- shared+packed: several pairs per row of up to T tokens (`--pack T`).
Each (layout, T) runs in a fresh subprocess: one forward and backward of r2q's scorer (the loss is the summed
log-probs; the model is a 2-layer Llama, hidden 128, sdpa attention) after one warm-up step. Reported: the step's
wall time, its peak resident memory above the memory before the step (ru_maxrss, so the attention masks, activations
and gradients), the rows and padded tokens the layout runs, and the scored tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def batch_of(layout: str, T: int, pairs: int, seed: int = 0):
    import random

    from r2q.tokens import build_pair_batch

    rng = random.Random(seed)
    P, C, R = [], [], []
    for i in range(pairs):
        n = T // 4 + (3 * T // 4) * i // max(pairs - 1, 1)  # T/4 ... T
        P.append([rng.randrange(2, 4000) for _ in range(n // 2)])
        C.append([rng.randrange(2, 4000) for _ in range(n // 4)])
        R.append([rng.randrange(2, 4000) for _ in range(n - n // 2 - n // 4)])
    if layout == "plain":
        return build_pair_batch(P, C, R, 0)
    return build_pair_batch(P, C, R, 0, share_prefix=True, pack_to=T if layout == "shared+packed" else 0)


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(layout: str, T: int, pairs: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from r2q.tokens import TokenScorer
    from r2q.toy import tiny_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = tiny_config("llama", 4096, hidden=128, layers=2, heads=4, max_positions=8192)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    scorer = TokenScorer(model)
    b = batch_of(layout, T, pairs)

    def step():
        model.zero_grad(set_to_none=True)
        scorer(b.input_ids, b.attention_mask, b.position_ids, b.src_index, b.targets).sum().backward()

    step()  # warm-up
    before = rss_kb()
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layout": layout, "T": T, "rows": int(b.input_ids.shape[0]), "row_len": int(b.input_ids.shape[1]),
            "padded_tokens": int(b.input_ids.numel()), "real_tokens": b.num_tokens, "scored": int(b.targets.numel()),
            "step_s": dt, "peak_above_start_mb": max(peak - before, 0) / 1024,
            # the boolean (rows, 1, T, T) mask sdpa attends with: r2q builds it from the shared rows' block and
            # segment ids inside the forward; transformers builds it from the plain rows' padding mask
            "mask_mb": b.input_ids.shape[0] * b.input_ids.shape[1] ** 2 / 2**20,
            "scored_per_s": int(b.targets.numel()) / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="layouts.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.pairs, a.threads)))
        return
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for T in a.lengths:
        for layout in ("plain", "shared", "shared+packed"):
            out = subprocess.run([sys.executable, __file__, "--child", layout, str(T), "--pairs", str(a.pairs),
                                  "--threads", str(a.threads)], capture_output=True, text=True, env=env)
            if out.returncode:
                rows.append({"layout": layout, "T": T, "error": out.stderr.strip().splitlines()[-1][:200]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
