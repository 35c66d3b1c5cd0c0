"""DPO training throughput and memory: r2q's Trainer against TRL's DPOTrainer, same model, data and settings.

    python benchmarks/train_vs_trl.py                 # 3 rounds x (TRL, r2q shared, r2q plain), ~7 min on 2 idle cores
    python benchmarks/train_vs_trl.py --quick         # smoke test of the script, ~2 min

What is compared. One GPT-2-style model (default n_embd 256, 6 layers, 8 heads, vocab 8192 from a byte-level
BPE trained here on synthetic text; dropout off, since TRL disables it by default and r2q does not), saved
once and loaded by every run. One set of preference pairs (prompts ~64 tokens, completions ~48 tokens
including EOS; the lengths are checked on the token ids TRL itself produces). Both trainers run DPO
(sigmoid, beta 0.1) with the reference = the initial policy, its log-probs precomputed before training
(TRL: precompute_ref_log_probs=True; r2q: precompute_ref=True, ref='init'), fp32 (TRL: bf16=False), no
gradient checkpointing, AdamW with the same lr / linear schedule / no warm-up / clip 1.0, the same batch
size and number of steps, no checkpoints, no eval, no progress bars, logging as light as each allows.

How it is measured. Each run is a fresh subprocess (so its peak RSS, `ru_maxrss`, is its own) with
torch.set_num_threads(N) (default 2, the same for all), OMP_NUM_THREADS=N and OMP_WAIT_POLICY=PASSIVE (see
--omp-wait-policy: on a shared machine, spinning OpenMP workers make 2-thread runs stall whenever another
process wants a core). The runs are interleaved, round after round of [TRL, r2q shared, r2q plain], and the
table reports medians over rounds. Throughput counts the training steps only, skipping `--warmup` steps:
model load, tokenisation and the reference precompute are excluded.
  * TRL: a TrainerCallback; the time from on_step_begin of the first measured step to on_step_end of the last.
  * r2q: the sum of the `step_time_s` metric over the measured steps (`pairs/s`), and, as a like-for-like
    check against TRL's span, the wall time from the entry of the first measured `train_step` to the exit
    of the last (`span pairs/s`; it also counts r2q's per-step work outside `train_step`).
  * `median-step pairs/s`: batch size / the median measured step time of a run, a figure robust to a few
    steps slowed by other processes; `best pairs/s`: the best round.
FLOP/s: FLOPs = 6 * N_body * T + 6 * d * V * S, where N_body = the non-embedding parameters (the 6 layers
and the final LayerNorm; the token and position embeddings are lookups and are not counted), T = the
non-padding tokens the model runs (per pair: P + C + R with prefix sharing, 2P + C + R without), S = the
scored positions that go through the LM head (C + R per pair for r2q; TRL projects every position of its
padded rows). Attention's score and value matmuls (12 * layers * d * context per token) are not counted;
the script prints their share. The reference is the rate of a 2048x2048 fp32 torch.mm (2 * n^3 FLOPs),
median of several, with the same thread count, measured in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BETA = 0.1
MODES = ("trl", "r2q-shared", "r2q-plain", "r2q-packed")


# ----------------------------------------------------------------------------- synthetic data


def _lexicon(n: int, rng: random.Random) -> list[str]:
    """n distinct pseudo-words built from syllables, so a BPE vocabulary of several thousand is learnable."""
    cons = "b c d f g h j k l m n p r s t v w z ch sh th tr st pl".split()
    vows = "a e i o u ai ea ou".split()
    words: set[str] = set()
    while len(words) < n:
        k = rng.choice((1, 2, 2, 3, 3, 4))
        words.add("".join(rng.choice(cons) + rng.choice(vows) for _ in range(k)) + rng.choice(("", "", "n", "s")))
    return sorted(words)


class TextGen:
    """Zipf-distributed pseudo-word text with punctuation."""

    def __init__(self, seed: int = 0, n_words: int = 20000):
        self.rng = random.Random(seed)
        self.words = _lexicon(n_words, self.rng)
        self.weights = [1.0 / (i + 10) for i in range(len(self.words))]

    def words_(self, k: int) -> list[str]:
        ws = self.rng.choices(self.words, self.weights, k=k)
        return [w + ("." if self.rng.random() < 0.08 else ",") if self.rng.random() < 0.15 else w for w in ws]

    def sentence(self) -> str:
        return " ".join(self.words_(self.rng.randint(6, 20)))


_COUNTS: dict[str, int] = {}


def text_of_tokens(gen: TextGen, tok, target: int, lead_space: bool) -> str:
    """Text of exactly `target` tokens (words appended one by one; the byte-level pre-tokenizer splits at
    spaces, so a word's tokens do not depend on the words before it)."""
    words: list[str] = []
    n = 0
    while n < target:
        w = gen.words_(1)[0]
        piece = (" " if (words or lead_space) else "") + w
        if piece not in _COUNTS:
            _COUNTS[piece] = len(tok(piece, add_special_tokens=False)["input_ids"])
        k = _COUNTS[piece]
        if n + k > target:
            if n >= target - 2:  # close enough; avoid looping on a long word at the end
                break
            continue
        words.append(piece)
        n += k
    return "".join(words)


def make_pairs(tok, n: int, prompt_len: int, comp_len: int, jitter: int, seed: int, spread: bool = False
               ) -> list[dict]:
    gen = TextGen(seed + 1)
    rng = random.Random(seed + 2)
    pairs = []

    def length(nominal: int) -> int:  # +-jitter, or (spread) anywhere from half to twice the nominal length
        return max(2, round(nominal * rng.uniform(0.5, 2.0))) if spread else nominal + rng.randint(-jitter, jitter)

    for _ in range(n):
        p = text_of_tokens(gen, tok, length(prompt_len), lead_space=False)
        # completions start with a space and the prompt ends in a word: the boundary is a token boundary, so
        # TRL's joint tokenization and r2q's separate one give the same ids. -1: EOS is appended by both.
        c = text_of_tokens(gen, tok, length(comp_len) - 1, lead_space=True)
        r = text_of_tokens(gen, tok, length(comp_len) - 1, lead_space=True)
        pairs.append({"prompt": p, "chosen": c, "rejected": r})
    return pairs


def prepare(work: Path, a) -> dict:
    """Tokenizer, initial model and pairs, written under `work`; returns a summary."""
    import torch

    from r2q.toy import save_model, tiny_config, train_bpe_tokenizer

    t0 = time.perf_counter()
    gen = TextGen(a.seed)
    corpus = [gen.sentence() for _ in range(12000)]
    tok = train_bpe_tokenizer(corpus, vocab_size=a.vocab, chat_template=None)
    cfg = tiny_config("gpt2", len(tok), hidden=a.hidden, layers=a.layers, heads=a.heads, max_positions=512)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = tok.eos_token_id
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    save_model(model, tok, work / "model")
    n_pairs = a.batch_size * (a.steps + a.warmup)
    pairs = make_pairs(tok, n_pairs, a.prompt_len, a.completion_len, a.jitter, a.seed, a.spread)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (work / "sanity.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[: a.batch_size]))
    counts = param_counts(model)
    return {"vocab": len(tok), **counts, "pairs": n_pairs, "prepare_s": time.perf_counter() - t0}


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"params_total": total, "params_body": total - emb, "d": model.config.n_embd,
            "layers": model.config.n_layer, "heads": model.config.n_head}


# ----------------------------------------------------------------------------- children


def _rss_now_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _setup_child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)


def _load_rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def child_matmul(a, work: Path) -> dict:
    import torch

    _setup_child(a)
    n = a.mm_size
    x, y = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(x, y)
    times = []
    for _ in range(a.mm_reps):
        t0 = time.perf_counter()
        torch.mm(x, y)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "median_s": med, "flops": 2 * n**3 / med, "best_flops": 2 * n**3 / min(times),
            "threads": torch.get_num_threads()}


def child_trl(a, work: Path, rows_file: str, steps: int, log_every: int) -> dict:
    rss0 = _rss_now_kb()
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets")  # a fresh cache per run: no reuse across runs
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    _setup_child(a)
    rss_imports = _rss_now_kb()
    tok = AutoTokenizer.from_pretrained(work.parent / "model")
    model = AutoModelForCausalLM.from_pretrained(work.parent / "model", dtype=torch.float32)

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.logs = [], [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({"step": state.global_step, **(logs or {})})

    timer = Timer()
    args = DPOConfig(
        output_dir=str(work / "out"), beta=BETA, loss_type=["sigmoid"], learning_rate=a.lr,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=a.batch_size, max_steps=steps, max_length=1024,
        precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=log_every, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=a.seed,
    )
    rows = _load_rows(work.parent / rows_file)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer])
    ds = trainer.train_dataset
    ids = {k: [list(x) for x in ds[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    rss_ready = _rss_now_kb()
    trainer.train()
    w = a.warmup if steps > a.warmup else 0
    span = timer.end[-1] - timer.begin[w]
    per_step = [e - b for b, e in zip(timer.begin, timer.end)]
    # TRL's padded rows: 2B rows of max(P + C_or_R) in the batch; every position goes through the LM head
    return {
        "pairs_per_s": (steps - w) * a.batch_size / span, "train_s": span, "step_s": per_step,
        "median_step_pairs_per_s": a.batch_size / statistics.median(per_step[w:]),
        "step_sum_s": sum(per_step[w:]), "logs": timer.logs, "ids": ids,
        "rss_start_kb": rss0, "rss_imports_kb": rss_imports, "rss_ready_kb": rss_ready,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def child_r2q(a, work: Path, rows_file: str, steps: int, share: bool, pack: bool = False) -> dict:
    rss0 = _rss_now_kb()
    import torch

    from r2q.data import preference_examples_from_rows
    from r2q.models import load_model, load_tokenizer
    from r2q.train import TrainConfig, Trainer

    _setup_child(a)
    rss_imports = _rss_now_kb()
    tok = load_tokenizer(work.parent / "model")
    model = load_model(work.parent / "model")
    examples, _ = preference_examples_from_rows(_load_rows(work.parent / rows_file), tok)

    spans: list[tuple[float, float, list[int]]] = []

    class Timed(Trainer):
        def train_step(self, step_idx):
            t0 = time.perf_counter()
            m = super().train_step(step_idx)
            spans.append((t0, time.perf_counter(), list(step_idx)))
            return m

    cfg = TrainConfig(
        model=str(work.parent / "model"), out=str(work / "out"), ref="init", beta=BETA, loss="sigmoid", lr=a.lr,
        schedule="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=steps,
        batch_size=a.batch_size, grad_accum=1, share_prefix=share, precompute_ref=True,
        pack=max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples) if pack else 0,
        cache_dir=str(work / "refcache"), dtype="fp32", seed=a.seed, log_every=1, quiet=True, overwrite=True,
    )
    trainer = Timed(cfg, "dpo", model=model, tokenizer=tok, train_examples=examples)
    rss_ready = _rss_now_kb()
    result = trainer.run()
    w = a.warmup if steps > a.warmup else 0
    train = [m for m in result.metrics if m.get("split") == "train"]
    step_s = [m["step_time_s"] for m in train]
    measured = sum(step_s[w:])
    span = spans[-1][1] - spans[w][0]
    # tokens the model runs and positions scored, per measured step, from the examples of each step
    tokens = scored = 0
    for _, _, idx in spans[w:]:
        for i in idx:
            e = examples[i]
            P, C, R = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
            tokens += P + C + R if share else 2 * P + C + R
            scored += C + R
    ids = {"prompt_ids": [e.prompt_ids for e in examples], "chosen_ids": [e.chosen_ids for e in examples],
           "rejected_ids": [e.rejected_ids for e in examples]}
    return {
        "pairs_per_s": (steps - w) * a.batch_size / measured, "train_s": measured, "step_s": step_s,
        "span_pairs_per_s": (steps - w) * a.batch_size / span, "span_s": span,
        "median_step_pairs_per_s": a.batch_size / statistics.median(step_s[w:]),
        "tokens": tokens, "scored": scored, "logs": [{k: v for k, v in m.items() if not isinstance(v, str)}
                                                     for m in train],
        "ids": ids, "threads": torch.get_num_threads(),
        "rss_start_kb": rss0, "rss_imports_kb": rss_imports, "rss_ready_kb": rss_ready,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def run_child(a, work: Path, mode: str, tag: str, extra: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its result comes back as JSON in a file."""
    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    out = d / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               **({"OMP_WAIT_POLICY": a.omp_wait_policy} if a.omp_wait_policy != "default" else {}),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--child", mode, "--child-dir", str(d), "--child-out", str(out),
           *extra, *a.passthrough]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child {tag} failed (rc {proc.returncode})")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    res["load1"] = os.getloadavg()[0]
    return res


# ----------------------------------------------------------------------------- report


def flops_of(res: dict, mode: str, info: dict) -> float:
    """6 * N_body * tokens + 6 * d * V * scored, over the measured steps (see the module docstring)."""
    return 6.0 * info["params_body"] * res["tokens"] + 6.0 * info["d"] * info["vocab"] * res["scored"]


def attention_share(info: dict, res: dict, share: bool, a) -> float:
    """Attention score/value FLOPs as a fraction of the counted ones (dense T x T per row, as executed)."""
    ctx = (a.prompt_len + 2 * a.completion_len) if share else (a.prompt_len + a.completion_len)
    per_token = 12 * info["layers"] * info["d"] * ctx  # fwd+bwd of QK^T and AV over a full context
    return per_token * res["tokens"] / flops_of(res, "", info)


def check_lengths(results: dict[str, list[dict]]) -> None:
    """Token lengths of all pairs (TRL's ids when TRL ran), and whether both trainers saw the same ids."""
    first = {m: rs[0]["ids"] for m, rs in results.items() if rs}
    ids = first.get("trl") or next(iter(first.values()))
    P = [len(x) for x in ids["prompt_ids"]]
    C = [len(x) for x in ids["chosen_ids"]] + [len(x) for x in ids["rejected_ids"]]
    print(f"lengths over all {len(P)} pairs: prompt {min(P)}-{max(P)} (mean {statistics.mean(P):.1f}), completion "
          f"{min(C)}-{max(C)} (mean {statistics.mean(C):.1f}) tokens incl. EOS")
    if "trl" in first:
        for m, other in first.items():
            if m != "trl":
                print(f"  {m}: token ids identical to TRL's: {other == first['trl']}")


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of TRL, r2q shared, r2q plain")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps run first and not measured")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (both trainers)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every run")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=48, help="tokens per completion, EOS included")
    p.add_argument("--jitter", type=int, default=4, help="lengths vary uniformly by +-jitter tokens")
    p.add_argument("--spread", action="store_true", help="lengths vary from half to twice the nominal ones (each "
                   "prompt and completion drawn uniformly), as real pairs do; --jitter is then unused")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                   help="OMP_WAIT_POLICY of every run ('default': inherit). PASSIVE: idle OpenMP workers sleep\n"
                        "instead of spinning, which keeps 2-thread runs from stalling when other processes\n"
                        "compete for the cores (3-5x slower, bimodal steps otherwise); same for both trainers")
    p.add_argument("--mm-size", type=int, default=2048)
    p.add_argument("--mm-reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round, 4 steps, batch 4, small model")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--no-sanity", action="store_true", help="skip the step-1/2 loss check against TRL")
    p.add_argument("--keep", default="", help="keep the work directory here (default: a temp dir, removed)")
    p.add_argument("--json", default="", help="also write all raw results to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-rows", default="pairs.jsonl", help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-log-every", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.steps, a.batch_size, a.mm_reps = 1, 4, 4, 3
        a.hidden, a.layers, a.heads, a.vocab = 128, 2, 4, 2048
    # the options every child needs (model shape is read from disk, not from these)
    a.passthrough = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
                     "--threads", str(a.threads), "--warmup", str(a.warmup), "--seed", str(a.seed),
                     "--mm-size", str(a.mm_size), "--mm-reps", str(a.mm_reps)]

    if a.child:
        work = Path(a.child_dir)
        steps = a.child_steps or (a.steps + a.warmup)
        if a.child == "matmul":
            res = child_matmul(a, work)
        elif a.child == "trl":
            res = child_trl(a, work, a.child_rows, steps, a.child_log_every or 10**9)
        else:
            res = child_r2q(a, work, a.child_rows, steps, share=a.child in ("r2q-shared", "r2q-packed"),
                            pack=a.child == "r2q-packed")
        Path(a.child_out).write_text(json.dumps(res))
        return

    import shutil

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="r2q_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in a.modes.split(",") if m]
    try:
        report(a, work, modes)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(a, work: Path, modes: list[str]) -> None:
    import platform

    import torch

    print(f"# train_vs_trl: {platform.node()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
          f"torch threads per run = {a.threads}, OMP_WAIT_POLICY {a.omp_wait_policy}, "
          f"load avg at start {os.getloadavg()[0]:.2f}")
    info = prepare(work, a)
    print(f"model: GPT-2 n_embd {info['d']}, {info['layers']} layers, {info['heads']} heads, vocab {info['vocab']} "
          f"(BPE trained here): {info['params_total'] / 1e6:.2f}M parameters, {info['params_body'] / 1e6:.2f}M "
          f"non-embedding; {info['pairs']} pairs; batch {a.batch_size} pairs, {a.warmup} warm-up + {a.steps} "
          f"measured steps, lr {a.lr}, beta {BETA}")

    # --- sanity: same ids, same loss / grad norm at step 1, same loss at step 2 (same batch twice)
    sanity_extra = ["--child-rows", "sanity.jsonl", "--child-steps", "2", "--child-log-every", "1"]
    if not a.no_sanity:
        t = run_child(a, work, "trl", "sanity_trl", sanity_extra)
        r = run_child(a, work, "r2q-plain", "sanity_r2q", sanity_extra)
        rs = run_child(a, work, "r2q-shared", "sanity_r2q_shared", sanity_extra)
        tl = [x for x in t["logs"] if "loss" in x]
        print("sanity (one batch of the first pairs, 2 steps; step 1 loss = ln 2 since policy = reference):")
        for name, logs in (("TRL", [(x["loss"], x.get("grad_norm")) for x in tl]),
                           ("r2q plain", [(x["loss"], x["grad_norm"]) for x in r["logs"]]),
                           ("r2q shared", [(x["loss"], x["grad_norm"]) for x in rs["logs"]])):
            print(f"  {name:11s} " + "  ".join(f"step {i + 1}: loss {lo:.6f} grad_norm {g:.6f}"
                                               for i, (lo, g) in enumerate(logs)))
        print(f"  token ids of the batch identical (TRL's tokenization vs r2q.data): {t['ids'] == r['ids']}")

    mm = run_child(a, work, "matmul", "matmul_0", [])
    results: dict[str, list[dict]] = {m: [] for m in modes}
    mms = [mm]
    for rnd in range(a.rounds):
        for m in modes:
            res = run_child(a, work, m, f"{m}_{rnd}", [])
            results[m].append(res)
            extra = f"  span {res['span_pairs_per_s']:.2f} pairs/s" if "span_pairs_per_s" in res else ""
            print(f"round {rnd + 1} {m:10s} {res['pairs_per_s']:7.2f} pairs/s{extra}  peak RSS "
                  f"{res['maxrss_kb'] / 1024:6.0f} MiB  (run {res['wall_s']:.0f}s, load1 {res['load1']:.2f})",
                  flush=True)
        mms.append(run_child(a, work, "matmul", f"matmul_{rnd + 1}", []))
        if rnd == 0:
            check_lengths(results)
    mm_rate = med([x["flops"] for x in mms])

    # --- table
    base = results.get("trl")
    base_tp = med([x["pairs_per_s"] for x in base]) if base else None
    base_mem = med([x["maxrss_kb"] for x in base]) if base else None
    print()
    print(f"medians over {a.rounds} round(s); {a.threads} torch threads; fp32 mm {a.mm_size}^3 rate "
          f"{mm_rate / 1e9:.1f} GFLOP/s (median of {len(mms)} subprocesses x {a.mm_reps} reps)")
    hdr = (f"| {'run':10s} | pairs/s | vs TRL | best pairs/s | median-step pairs/s | vs TRL | "
           f"span pairs/s | vs TRL | peak RSS MiB | vs TRL | "
           f"RSS after imports MiB | GFLOP/s | % of mm |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    summary = {}
    for m in modes:
        rs = results[m]
        tp = med([x["pairs_per_s"] for x in rs])
        span = med([x.get("span_pairs_per_s", x["pairs_per_s"]) for x in rs])
        mem = med([x["maxrss_kb"] for x in rs])
        imp = med([x["rss_imports_kb"] for x in rs])
        if m == "trl":
            gf = pct = None
        else:
            rates = [flops_of(x, m, info) / x["train_s"] for x in rs]
            gf = med(rates)
            pct = gf / mm_rate
        mstep = med([x["median_step_pairs_per_s"] for x in rs])
        summary[m] = {"pairs_per_s": tp, "best_pairs_per_s": max(x["pairs_per_s"] for x in rs),
                      "median_step_pairs_per_s": mstep,
                      "span_pairs_per_s": span, "maxrss_mib": mem / 1024,
                      "rss_imports_mib": imp / 1024, "flops": gf, "mm_fraction": pct,
                      "vs_trl": tp / base_tp if base_tp else None,
                      "span_vs_trl": span / base_tp if base_tp else None,
                      "mem_vs_trl": mem / base_mem if base_mem else None}
        s = summary[m]

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        base_ms = summary.get("trl", {}).get("median_step_pairs_per_s")
        print(f"| {m:10s} | {tp:7.2f} | {f(s['vs_trl'], '6.2f')} | {s['best_pairs_per_s']:12.2f} | {mstep:19.2f} | "
              f"{f(base_ms and mstep / base_ms, '6.2f')} | {span:12.2f} | "
              f"{f(s['span_vs_trl'], '6.2f')} | "
              f"{mem / 1024:12.0f} | {f(s['mem_vs_trl'], '6.2f')} | {imp / 1024:21.0f} | "
              f"{f(gf and gf / 1e9, '7.1f')} | {f(pct and 100 * pct, '7.1f')} |")
    for m in modes:
        if m != "trl":
            att = attention_share(info, results[m][0], m != "r2q-plain", a)
            per_pair = flops_of(results[m][0], m, info) / (a.steps * a.batch_size)
            print(f"  {m}: FLOPs counted per measured pair {per_pair / 1e9:.3f} "
                  f"GFLOP; uncounted attention matmuls would add ~{100 * att:.0f}%")
    busy = [f"{m} round {i + 1} ({x['load1']:.1f})" for m, rs in results.items() for i, x in enumerate(rs)
            if x["load1"] > a.threads + 1]
    if busy:
        print(f"note: the 1-min load average exceeded {a.threads + 1} (this run's own {a.threads} threads + 1) after: "
              + ", ".join(busy) + "; other processes were competing for the CPUs, so those runs are noisy")
    if base:
        print("targets: r2q-shared/TRL >= 1.4, r2q-plain/TRL >= 1.05, r2q-packed/TRL >= 3 (on --spread lengths), "
              "peak RSS <= TRL's, >= 45% of mm rate")
        for m, goal in (("r2q-shared", 1.4), ("r2q-plain", 1.05), ("r2q-packed", 3.0)):
            if m in summary:
                s = summary[m]
                print(f"  {m}: speed {s['vs_trl']:.2f} ({'met' if s['vs_trl'] >= goal else 'NOT met'}), "
                      f"memory {s['mem_vs_trl']:.2f} ({'met' if s['mem_vs_trl'] <= 1.0 else 'NOT met'}), "
                      f"{100 * s['mm_fraction']:.0f}% of mm ({'met' if s['mm_fraction'] >= 0.45 else 'NOT met'})")
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "mm": mms, "summary": summary,
                                            "results": {m: [{k: v for k, v in x.items() if k != "ids"} for x in rs]
                                                        for m, rs in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
