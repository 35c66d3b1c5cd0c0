"""A DPO policy as an implicit process reward model, on the arithmetic task whose first errors are known.

    python benchmarks/prm_arithmetic.py [--seeds 0,1,2] [--out /tmp/prm] [--digits 3]

For each seed: a tiny Llama learns worked column additions by SFT (r2q sft), then DPO (r2q train, reference =
the SFT model) on pairs whose rejected solution has one error (a wrong column sum, a dropped carry or a wrong
answer digit). On held-out solutions, half correct and half with one error, each method scores every step (a line
of the solution) and predicts the first error as the first step whose score falls below a threshold (no step
below: "no error"). As ProcessBench scores it: accuracy on the erroneous solutions (the predicted step is the true
first error), accuracy on the correct ones (no error predicted), and F1, their harmonic mean. The threshold of each
method is chosen on a calibration half of the held-out problems and F1 is reported on the other half, with a
bootstrap interval over problems and the paired difference to the implicit PRM.

Methods (one formula each, all from `r2q credit`'s per-step output, delimiter "\\n"):
  implicit PRM      step reward sum_t beta log pi/pi_ref over the step's tokens (the paper's token reward)
  likelihood (DPO)  sum_t log pi of the step under the DPO policy (the reference-free reward / beta)
  likelihood (SFT)  sum_t log pi_ref of the step under the SFT model
Prints a markdown table for BENCHMARKS.md and writes OUT/prm.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from r2q.credit import score_pairs
from r2q.models import load_model, load_tokenizer
from r2q.stats import bootstrap
from r2q.tasks import arithmetic
from r2q.toy import save_model, tiny_model, train_bpe_tokenizer
from r2q.train import TrainConfig, train

METHODS = ("implicit PRM", "likelihood (DPO)", "likelihood (SFT)")


def build(out: Path, seed: int, digits: int, n_sft: int, n_pairs: int, sft_epochs: float, dpo_lr: float
          ) -> tuple[Path, Path]:
    """The SFT model and the DPO model of one seed (trained here; reused when present)."""
    sft_dir, dpo_dir = out / f"sft-{seed}", out / f"dpo-{seed}"
    if (dpo_dir / "model.safetensors").exists():
        return sft_dir, dpo_dir
    rng = random.Random(1000 + seed)
    problems = [(rng.randrange(10**digits), rng.randrange(10**digits)) for _ in range(n_sft)]
    rows = [{"prompt": arithmetic.prompt_text(a, b), "completion": arithmetic.solution(a, b)} for a, b in problems]
    tok_dir = out / "tokenizer"
    if not tok_dir.exists():
        texts = [r["prompt"] + r["completion"] for r in rows]
        train_bpe_tokenizer(texts, vocab_size=128, chat_template=None).save_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir)
    start = out / f"init-{seed}"
    save_model(tiny_model("llama", len(tok), seed=seed, hidden=128, layers=4), tok, start)
    _write(out / f"sft-{seed}.jsonl", rows)
    train(TrainConfig(model=str(start), data=str(out / f"sft-{seed}.jsonl"), out=str(sft_dir), lr=3e-3,
                      batch_size=32, epochs=sft_epochs, warmup_steps=50, schedule="cosine", max_length=96,
                      max_prompt_length=16, seed=seed, quiet=True, report_to="none"), mode="sft")
    pairs = arithmetic.make_pairs(n_pairs, seed=2000 + seed, digits=digits)
    _write(out / f"pairs-{seed}.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs])
    train(TrainConfig(model=str(sft_dir), data=str(out / f"pairs-{seed}.jsonl"), out=str(dpo_dir), ref="init",
                      beta=0.1, lr=dpo_lr, batch_size=16, epochs=1, warmup_steps=10, max_length=96,
                      max_prompt_length=16, seed=seed, quiet=True, report_to="none"))
    return sft_dir, dpo_dir


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def step_scores(sft_dir: Path, dpo_dir: Path, rows: list[dict], beta: float) -> dict[str, list[list[list[float]]]]:
    """Per method, per held-out row, the step scores of [chosen (correct), rejected (one error)]."""
    tok = load_tokenizer(dpo_dir)
    policy, ref = load_model(dpo_dir).eval(), load_model(sft_dir).eval()
    report = score_pairs(policy, ref, tok, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], beta,
                         delimiter="\n", use_cache=False, max_length=96, max_prompt_length=16)
    out: dict[str, list] = {m: [] for m in METHODS}
    for p in report.pairs:
        sides = (p.chosen, p.rejected)
        out["implicit PRM"].append([c.step_rewards for c in sides])
        out["likelihood (DPO)"].append([_step_sums(c.logps, c.step_ends) for c in sides])
        out["likelihood (SFT)"].append([_step_sums(c.ref_logps, c.step_ends) for c in sides])
    return out


def _step_sums(values: list[float], ends: list[int]) -> list[float]:
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [float(sum(values[s : e + 1])) for s, e in zip(starts, ends)]


def first_below(scores: list[float], tau: float) -> int:
    """The predicted first error: the first step scored below tau, or -1 (no error)."""
    return next((k for k, s in enumerate(scores) if s < tau), -1)


def f1_parts(scores: list[list[list[float]]], labels: list[int], tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per problem: (correct solution judged error-free, erroneous one's first error found), as 0/1 arrays."""
    ok_correct = np.array([first_below(s[0], tau) == -1 for s in scores], dtype=float)
    ok_error = np.array([first_below(s[1], tau) == lab for s, lab in zip(scores, labels)], dtype=float)
    return ok_correct, ok_error


def f1(ok_correct: np.ndarray, ok_error: np.ndarray) -> float:
    a, b = ok_correct.mean(), ok_error.mean()
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def best_threshold(scores, labels) -> float:
    """The threshold that maximises F1 on these problems (candidates: midpoints of the observed step scores)."""
    vals = np.unique(np.concatenate([np.array(s[0] + s[1]) for s in scores]))
    cands = np.concatenate([[vals[0] - 1.0], (vals[1:] + vals[:-1]) / 2, [vals[-1] + 1.0]])
    if len(cands) > 400:
        cands = np.quantile(cands, np.linspace(0, 1, 400))
    return float(max(cands, key=lambda t: f1(*f1_parts(scores, labels, t))))


def evaluate(scores: dict[str, list], labels: list[int], seed: int, n_boot: int) -> dict[str, dict]:
    n = len(labels)
    perm = np.random.default_rng(seed).permutation(n)
    cal, test = perm[: n // 2], perm[n // 2 :]
    parts, res = {}, {}
    for m in METHODS:
        tau = best_threshold([scores[m][i] for i in cal], [labels[i] for i in cal])
        oc, oe = f1_parts([scores[m][i] for i in test], [labels[i] for i in test], tau)
        parts[m] = (oc, oe)
        ci = bootstrap(lambda i, oc=oc, oe=oe: f1(oc[i], oe[i]), len(test), n_boot, seed=seed)
        res[m] = {"threshold": tau, "acc_correct": float(oc.mean()), "acc_error": float(oe.mean()), "f1": ci}
    base = parts["implicit PRM"]
    for m in METHODS[1:]:
        oc, oe = parts[m]
        res[m]["f1_minus_prm"] = bootstrap(lambda i, oc=oc, oe=oe: f1(oc[i], oe[i]) - f1(base[0][i], base[1][i]),
                                           len(test), n_boot, seed=seed)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="/tmp/r2q-prm")
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--n-sft", type=int, default=8000)
    ap.add_argument("--n-pairs", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=600)
    ap.add_argument("--sft-epochs", type=float, default=10)
    ap.add_argument("--dpo-lr", type=float, default=2e-4)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.perf_counter()
        sft_dir, dpo_dir = build(out, seed, args.digits, args.n_sft, args.n_pairs, args.sft_epochs, args.dpo_lr)
        rows = arithmetic.make_pairs(args.n_eval, seed=9000 + seed, digits=args.digits)
        labels = [r["rejected"][: r["error_char"]].count("\n") for r in rows]  # the step (line) of the first error
        scores = step_scores(sft_dir, dpo_dir, rows, 0.1)
        results[seed] = evaluate(scores, labels, seed, args.n_boot)
        results[seed]["seconds"] = time.perf_counter() - t0
        print(f"seed {seed}: {results[seed]['seconds']:.0f}s", flush=True)
    (out / "prm.json").write_text(json.dumps(results, indent=1))
    print("\n| seed | method | acc. correct | acc. erroneous | F1 [95% CI] | F1 - implicit PRM [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, res in results.items():
        for m in METHODS:
            r = res[m]
            d = r.get("f1_minus_prm")
            diff = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "-"
            print(f"| {seed} | {m} | {r['acc_correct']:.3f} | {r['acc_error']:.3f} | {r['f1'][0]:.3f} "
                  f"[{r['f1'][1]:.3f}, {r['f1'][2]:.3f}] | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
