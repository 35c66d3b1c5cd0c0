"""Gradient checkpointing: activation memory and step time of one DPO micro-batch, with and without.

    python benchmarks/checkpointing.py [--layers 8] [--hidden 256] [--pairs 8] [--length 512] [--threads 2]

One forward and backward of r2q's scorer (summed log-probs of prefix-shared pairs, `length` tokens per pair) on a
Llama of the given shape, sdpa attention, fp32. Reported for each setting: the bytes autograd saves for the backward
(every tensor packed by saved_tensors_hooks: the activations a step keeps), the peak resident memory above the
memory before the step (ru_maxrss, in a fresh subprocess per setting), and the step time (median of 3 after a
warm-up). The gradients of the two settings are checked equal (1e-5) before anything is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def child(ckpt: bool, a) -> dict:
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from r2q.tokens import TokenScorer, build_pair_batch
    from r2q.toy import tiny_config

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = tiny_config("llama", 4096, hidden=a.hidden, layers=a.layers, heads=8, max_positions=4096)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rng = random.Random(0)
    n = a.length

    def ids(k):
        return [rng.randrange(2, 4000) for _ in range(k)]

    b = build_pair_batch([ids(n // 2) for _ in range(a.pairs)], [ids(n // 4) for _ in range(a.pairs)],
                         [ids(n // 4) for _ in range(a.pairs)], 0, share_prefix=True)
    scorer = TokenScorer(model)
    saved = []

    def step(count=False):
        model.zero_grad(set_to_none=True)
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t) if count else None
        if hooks:
            with hooks:
                out = scorer(b.input_ids, b.attention_mask, b.position_ids, b.src_index, b.targets)
        else:
            out = scorer(b.input_ids, b.attention_mask, b.position_ids, b.src_index, b.targets)
        out.sum().backward()

    step(count=True)  # warm-up, and the saved bytes
    before = _rss_kb()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = {k: p.grad.flatten()[:2000].tolist() for k, p in model.named_parameters()}
    return {"checkpointing": ckpt, "saved_mb": sum(saved) / 2**20, "peak_above_start_mb": max(peak - before, 0) / 1024,
            "step_s": statistics.median(times), "grads": grads}


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=("plain", "ckpt"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child == "ckpt", a)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    res = {}
    for mode in ("plain", "ckpt"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--layers", str(a.layers), "--hidden",
                              str(a.hidden), "--pairs", str(a.pairs), "--length", str(a.length), "--threads",
                              str(a.threads)], capture_output=True, text=True, env=env, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    for k, g in res["plain"]["grads"].items():
        torch.testing.assert_close(torch.tensor(res["ckpt"]["grads"][k]), torch.tensor(g), atol=1e-5, rtol=1e-5)
    p, c = res["plain"], res["ckpt"]
    print(f"gradients equal (1e-5); {a.layers} layers, hidden {a.hidden}, {a.pairs} pairs x {a.length} tokens, "
          f"{a.threads} threads")
    print("| setting | saved for backward (MiB) | peak above start (MiB) | step (s) |")
    print("| --- | --- | --- | --- |")
    for name, r in (("plain", p), ("--gradient-checkpointing", c)):
        print(f"| {name} | {r['saved_mb']:.0f} | {r['peak_above_start_mb']:.0f} | {r['step_s']:.2f} |")
    peak = c["peak_above_start_mb"] / max(p["peak_above_start_mb"], 1)
    print(f"saved x{c['saved_mb'] / p['saved_mb']:.2f}, peak x{peak:.2f}, time x{c['step_s'] / p['step_s']:.2f}")


if __name__ == "__main__":
    main()
