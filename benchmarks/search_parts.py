"""Where a beam search's time goes beyond its forwards: timers around each part, on one shape of search_vs_hf.py.

    python benchmarks/search_parts.py --shape 12m --K 4 [--demo DIR] [--threads 1] [--repeats 9] [--out F]

Each part is timed by wrapping the function that does it (time.perf_counter around the call; the wrappers cost
~1 us a call): the model forwards (a hook pair on the model), the log-softmax and the rest of the lockstep's model
call, the top-k over K x V, the beam step's bookkeeping (`_advance` less its top-k), the cache reorders (the first
one, which makes K rows of each prompt and which the bare forwards pay too, apart from the moves of later steps),
`Moves.of` (building the plan), and what is left of the search (the loop, encoding, results). The bare forwards of
the same trace are timed in between, as in search_vs_hf.py's overhead. Medians over --repeats searches, in ms per
search and per model call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import search_vs_hf as S  # noqa: E402  (the shapes, models and bare forwards of the main benchmark)

import r2q.search.beam as beam  # noqa: E402
import r2q.search.cache as cache  # noqa: E402
import r2q.search.lm as lm  # noqa: E402

ACC: Counter = Counter()


def timer(owner, name: str, label: str, split=None) -> None:
    """Wrap owner.name so each call adds its seconds to ACC[label] (or to ACC[split(args)])."""
    f = getattr(owner, name)

    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            ACC[split(a, kw) if split else label] += time.perf_counter() - t0

    setattr(owner, name, wrapped)


def hook_forwards(model) -> None:
    """Time every forward of `model` (from its pre-hook to its hook)."""
    start: list[float] = []
    model.register_forward_pre_hook(lambda m, a: start.append(time.perf_counter()))
    model.register_forward_hook(lambda m, a, o: ACC.__setitem__("forwards", ACC["forwards"] + time.perf_counter()
                                                                 - start.pop()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("12m", "32k", "demo"), default="12m")
    ap.add_argument("--demo", default="", help="an r2q demo directory (for --shape demo)")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=0, help="default: 48 on the demo shape, else 64")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.shape == "demo":
        if not a.demo:
            ap.error("--shape demo needs --demo DIR")
        pol, _, prompts, S.PAD = S.demo_shape(a.demo)
        S.EOS = S.PAD
        new = a.new_tokens or 48
    else:
        s = next(v for k, v in S.SHAPES.items() if k.lower().startswith(a.shape))
        pol, prompts, new = S.model_of(s, 0), S.prompts_of(s), a.new_tokens or 64
    trace = S.traced(pol, prompts, a.K, new)
    calls = len(trace)
    timer(lm.Lockstep, "_run", "model calls")
    timer(beam, "_top_k", "top-k over K x V")
    timer(beam, "_advance", "beam step")
    timer(lm.Lockstep, "select", "", split=lambda a, kw: "reorders" if len(a) > 2 or "starts" in kw else
          "first reorder (bare pays it too)")
    timer(cache.Moves, "of", "Moves.of")
    hook_forwards(pol)
    per: dict[str, list[float]] = {}
    bare = []
    for i in range(a.repeats + 2):
        ACC.clear()
        t0 = time.perf_counter()
        S.r2q_generate(pol, prompts, a.K, new)
        got = dict(ACC, search=time.perf_counter() - t0)
        t0 = time.perf_counter()
        S.bare_forwards([pol], prompts, trace)
        if i >= 2:  # two warm-up rounds
            bare.append(time.perf_counter() - t0)
            got["log-softmax and the rest of a model call"] = got.pop("model calls") - got["forwards"]
            got["beam step's Python"] = got.pop("beam step") - got["top-k over K x V"]
            got["reorders"] = got.get("reorders", 0.0) - got.get("Moves.of", 0.0)
            got["rest of the search loop"] = got["search"] - sum(v for k, v in got.items() if k != "search")
            for k, v in got.items():
                per.setdefault(k, []).append(v)
    med = {k: statistics.median(v) * 1e3 for k, v in per.items()}
    b = statistics.median(bare) * 1e3
    row = dict(shape=a.shape, K=a.K, threads=a.threads, new_tokens=new, prompts=len(prompts), model_calls=calls,
               repeats=a.repeats, bare_forwards_ms=b, search_ms=med["search"],
               overhead=med["search"] / b, parts_ms=med)
    print(f"{a.shape} K={a.K} threads={a.threads}: search {med['search']:.1f} ms, bare forwards {b:.1f} ms "
          f"(overhead {med['search'] / b:.3f}), {calls} model calls")
    for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
        if k != "search":
            print(f"  {k:45s} {v:8.1f} ms  {v / calls:6.3f} ms a call  {100 * v / b:5.1f}% of bare")
    if a.out:
        Path(a.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
