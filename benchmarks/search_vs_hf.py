"""r2q's search against transformers' `generate`, on the same model, prompts and thread count.

    python benchmarks/search_vs_hf.py [--repeats 3] [--threads 1 2] [--out search_vs_hf.json]

For each shape (a 12M-parameter Llama with short prompts; a 32k-vocabulary model with 256-token prompts), each
thread count and each width K (1 = greedy, 4, 16): r2q's `beam` (generate_ids) and `model.generate(num_beams=K)`
run interleaved, `repeats` times each; the outputs must be identical token for token (the script stops if not).
Also reward-beam against beam, best-of-n (N = 4) against one sample, and MCTS's cost per simulation (16 simulations
minus 8, so the once-per-prompt costs cancel) without rollouts, with full rollouts and with the default 8-token cap.
Each search is also timed against the bare forwards it needs: the same model calls (rows and positions, every model
with its KV cache) and nothing else, so that ratio (overhead, >= 1) is what the search logic itself adds.
Reported: medians and their ratios (r2q's speed over transformers': > 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from r2q.search import GenerateConfig, generate_ids
from r2q.search.config import USED_BY
from r2q.search.lm import Compute, left_pad

PAD, EOS = 0, 1
SHAPES = {
    "12M, short prompts": dict(vocab=4096, hidden=384, layers=6, heads=6, prompts=8, prompt_len=(1, 8)),
    "32k vocab, 256-token prompts": dict(vocab=32000, hidden=256, layers=4, heads=4, prompts=8, prompt_len=(256, 256)),
}


def model_of(s: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["hidden"] * 2,
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=1024, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky, so that beams rarely tie and the parity check is meaningful
        m.lm_head.weight.mul_(8.0)
    m.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return m


def prompts_of(s: dict, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = s["prompt_len"]
    return [[rng.randrange(2, s["vocab"]) for _ in range(rng.randint(lo, hi))] for _ in range(s["prompts"])]


def demo_shape(d: str, n: int = 16):
    """The demo's DPO (b) policy and its reference (an SFT-trained 1.6M Llama on IMDb reviews, whose outputs end
    at EOS), on the first n held-out search prompts of an `r2q demo` directory."""
    from r2q.models import load_model, load_tokenizer
    from r2q.search import encode_prompts

    root = Path(d)
    run = root / "dpo-b" if (root / "dpo-b").exists() else root / "seed-0" / "dpo-b"  # a run with --seeds
    cfg = json.loads((run / "model" / "r2q_config.json").read_text())
    tok = load_tokenizer(root / "sft" / "model")
    rows = [json.loads(x) for x in (root / "data" / "search_prompts.jsonl").read_text().splitlines()[:n]]
    pol, ref = load_model(run / "model").eval(), load_model(cfg["model"]).eval()
    return pol, ref, encode_prompts(tok, [r["prompt"] for r in rows]), tok.eos_token_id


@torch.no_grad()
def hf_generate(model, prompts, K: int, new: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, PAD)
    gc = GenerationConfig(num_beams=K, do_sample=False, length_penalty=0.0, early_stopping=False,
                          max_new_tokens=new, pad_token_id=PAD, eos_token_id=EOS)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:]
    res = []
    for row in out.tolist():
        n = next((i + 1 for i, x in enumerate(row) if x == EOS), len(row))
        res.append(row[:n])
    return res


def search_config(method: str, K: int, new: int, **kw) -> GenerateConfig:
    """The config of a K-wide search (K beams where the method has beams; other methods ignore K)."""
    beams = {"num_beams": K} if method in USED_BY["num_beams"] else {}
    return GenerateConfig(method=method, max_new_tokens=new, **beams, **kw)


def r2q_generate(model, prompts, K: int, new: int, method: str = "beam", ref=None, **kw):
    cfg = search_config(method, K, new, **kw)
    out, compute = generate_ids(model, prompts, cfg, [EOS], PAD, ref=ref, generator=torch.Generator().manual_seed(0))
    return [h.token_ids for h in out], compute


def traced(model, prompts, K: int, new: int, method: str = "beam", ref=None, **kw):
    """The model calls a search makes: [(model index, rows, new positions)], in order."""
    compute = Compute(trace=[])
    cfg = search_config(method, K, new, **kw)
    generate_ids(model, prompts, cfg, [EOS], PAD, ref=ref, generator=torch.Generator().manual_seed(0),
                 compute=compute)
    return compute.trace


@torch.no_grad()
def bare_forwards(models, prompts, trace) -> None:
    """The same model calls as `trace` (the same rows and positions, each model with the KV cache r2q's searches
    use, room allocated once) and nothing else: no scores, no top-k, no reordering of beams. Where the rows change
    (beams or samples made from the prompt, finished rows leaving) the cache keeps as many rows, whichever they are.
    """
    from r2q.search.cache import new_cache
    from r2q.search.lm import _cache_kwarg

    ids, mask = left_pad(prompts, PAD)
    new = sum(n for j, _, n in trace if j == 0) - ids.shape[1]
    for i, m in enumerate(models):
        cache, msk, rows = new_cache(m, new), mask, ids.shape[0]
        calls = [(r, n) for j, r, n in trace if j == i]
        for k, (r, n) in enumerate(calls):
            if r != rows:
                idx = torch.arange(r) % rows
                cache.batch_select_indices(idx)
                msk, rows = msk.index_select(0, idx), r
            if k:
                msk = torch.cat([msk, msk.new_ones(r, n)], dim=1)
            x = ids if k == 0 else torch.full((r, n), 2, dtype=torch.long)
            pos = (msk.cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
            # (the cache under the name r2q passes it: transformers 5.25's `past_key_values` shim costs a little)
            m(input_ids=x, attention_mask=msk, position_ids=pos, use_cache=True, logits_to_keep=1,
              **{_cache_kwarg(m): cache})


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


MIN_SECONDS = 0.0  # (--min-seconds)


def median_pair(repeats: int, a, b) -> tuple[float, float]:
    """Interleaved runs of a and b (a, b, a, b, ...); their median seconds. At least `repeats` pairs, and more (up
    to 100) until the pairs took MIN_SECONDS in all: short runs are noisy on a shared machine."""
    ta, tb = [], []
    while len(ta) < repeats or sum(ta) + sum(tb) < MIN_SECONDS and len(ta) < 100:
        ta.append(timed(a)[0])
        tb.append(timed(b)[0])
    return statistics.median(ta), statistics.median(tb)


def overhead(repeats, shape, params, threads, models, prompts, K, new, method, **kw) -> dict:
    """A search's time over the time of the bare forwards it needs (`bare_forwards` of its own trace)."""
    pol, ref = models[1 if method == "guided" else 0], (models[-1] if len(models) > 1 else None)
    trace = traced(pol, prompts, K, new, method, ref, **kw)
    t_search, t_bare = median_pair(repeats, partial(r2q_generate, pol, prompts, K, new, method, ref, **kw),
                                   partial(bare_forwards, models, prompts, trace))
    return dict(shape=shape, params=params, threads=threads, K=K, what=f"{method} / its bare forwards",
                r2q_s=t_search, other_s=t_bare, overhead=t_search / t_bare, model_calls=len(trace))


def names_of(*allowed: str):
    """An argparse type: a comma-separated subset of `allowed` (anything else is a usage error, exit 2)."""
    def parse(text: str) -> set[str]:
        got = set(text.split(","))
        if not got <= set(allowed):
            raise argparse.ArgumentTypeError(f"{', '.join(sorted(got - set(allowed)))} not among {', '.join(allowed)}")
        return got
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--demo", default="", help="an r2q demo directory: adds its DPO policy and prompts as a shape")
    ap.add_argument("--out", default="search_vs_hf.json")
    ap.add_argument("--beam-only", action="store_true", help="only beam against generate and its overhead")
    ap.add_argument("--shapes", type=names_of("12m", "32k", "demo"), default="12m,32k,demo",
                    help="which shapes: 12m, 32k, demo (demo needs --demo)")
    ap.add_argument("--min-seconds", type=float, default=0.0,
                    help="run each pair of timings more than --repeats times until they took this long")
    ap.add_argument("--parts", type=names_of("beam", "methods", "mcts"), default="beam,methods,mcts",
                    help="which measurements: beam (against generate), methods (two- and three-model), mcts")
    a = ap.parse_args()
    parts = {"beam"} if a.beam_only else a.parts
    global PAD, EOS, MIN_SECONDS
    MIN_SECONDS = a.min_seconds
    rows = []
    shapes = [(k, s) for k, s in SHAPES.items() if ("12m" if k.startswith("12M") else "32k") in a.shapes]
    shapes += [("demo policy (1.6M), outputs end at EOS", None)] if a.demo and "demo" in a.shapes else []
    for shape, s in shapes:
        if s is None:
            pol, ref, prompts, PAD = demo_shape(a.demo)
            EOS = PAD
            pol.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
        else:
            pol, ref = model_of(s, 0), model_of(s, 1)
            prompts = prompts_of(s)
            PAD, EOS = 0, 1
        params = sum(p.numel() for p in pol.parameters())
        for threads in a.threads:
            torch.set_num_threads(threads)
            for K in a.widths if "beam" in parts else ():
                ours, _ = r2q_generate(pol, prompts, K, a.new_tokens, "greedy" if K == 1 else "beam")
                theirs = hf_generate(pol, prompts, K, a.new_tokens)
                if ours != theirs:
                    raise SystemExit(f"{shape}, K={K}: r2q and transformers disagree; no timing reported")
                m = "greedy" if K == 1 else "beam"
                t_r2q, t_hf = median_pair(a.repeats, partial(r2q_generate, pol, prompts, K, a.new_tokens, m),
                                          partial(hf_generate, pol, prompts, K, a.new_tokens))
                rows.append(dict(shape=shape, params=params, threads=threads, K=K, what="beam vs generate",
                                 r2q_s=t_r2q, other_s=t_hf, speedup=t_hf / t_r2q, identical=True,
                                 mean_output_tokens=sum(map(len, ours)) / len(ours)))
                print(rows[-1], flush=True)
                rows.append(overhead(a.repeats, shape, params, threads, [pol], prompts, K, a.new_tokens, m))
                print(rows[-1], flush=True)
            if "methods" not in parts:
                continue
            K = 4
            t_rb, t_b = median_pair(a.repeats, partial(r2q_generate, pol, prompts, K, a.new_tokens, "reward-beam", ref),
                                    partial(r2q_generate, pol, prompts, K, a.new_tokens, "beam"))
            rows.append(dict(shape=shape, params=params, threads=threads, K=K, what="reward-beam / beam",
                             r2q_s=t_rb, other_s=t_b, ratio=t_rb / t_b))
            print(rows[-1], flush=True)
            for m, models, kw in (("reward-beam", [pol, ref], {}), ("best-of-n", [pol, ref], {"num_samples": 4}),
                                  ("guided", [ref, pol, ref], {})):
                rows.append(overhead(a.repeats, shape, params, threads, models, prompts, 4, a.new_tokens, m, **kw))
                print(rows[-1], flush=True)
            t_bon, t_s = median_pair(a.repeats, partial(r2q_generate, pol, prompts, 1, a.new_tokens, "best-of-n", ref,
                                                        num_samples=4),
                                     partial(r2q_generate, pol, prompts, 1, a.new_tokens, "sample", ref))
            rows.append(dict(shape=shape, params=params, threads=threads, K=4, what="best-of-n (N=4) / sample",
                             r2q_s=t_bon, other_s=t_s, ratio=t_bon / t_s))
            print(rows[-1], flush=True)
        torch.set_num_threads(a.threads[0])
        for rollout, cap in ((False, 0), (True, 0), (True, 8)) if "mcts" in parts else ():
            # the cost of a simulation is the difference between 16 and 8 simulations (the prefill, finishing an
            # incomplete answer and rescoring the answer are paid once per prompt, not per simulation)
            cost = {}
            for sims in (8, 16):
                _, cost[sims] = r2q_generate(pol, prompts, 1, a.new_tokens, "mcts", ref, simulations=sims,
                                             rollout=rollout, rollout_len=cap)
            _, g = r2q_generate(pol, prompts, 1, a.new_tokens, "greedy", ref)
            c8, c16 = cost[8], cost[16]
            rows.append(dict(shape=shape, params=params, threads=a.threads[0],
                             what=f"mcts rollout={rollout} rollout_len={cap}" + (" (default)" if cap == 8 else ""),
                             forwards_per_sim=(c16.forward_passes - c8.forward_passes) / 8,
                             tokens_per_sim_per_prompt=(c16.tokens_processed - c8.tokens_processed) / 8 / len(prompts),
                             tokens_vs_greedy_at_16=c16.tokens_processed / g.tokens_processed,
                             seconds_at_16=c16.wall_time_s))
            print(rows[-1], flush=True)
        # batched MCTS: wall time per simulation, 32 simulations, default rollouts
        for per_call in (1, 4, 8) if "mcts" in parts else ():
            t, (_, c) = timed(partial(r2q_generate, pol, prompts, 1, a.new_tokens, "mcts", ref, simulations=32,
                                      sims_per_call=per_call))
            rows.append(dict(shape=shape, params=params, threads=a.threads[0], what=f"mcts sims_per_call={per_call}",
                             seconds_per_sim=t / 32, forward_passes=c.forward_passes,
                             tokens_processed=c.tokens_processed))
            print(rows[-1], flush=True)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
