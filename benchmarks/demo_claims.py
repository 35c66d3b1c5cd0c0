"""Run `r2q demo` for two sets of seeds and report, claim by claim, whether the verdicts agree.

    python benchmarks/demo_claims.py --sets 0,1,2 3,4,5 --out /tmp/demo-claims [--profile quick] [--workers 2]

Both sets run in one output directory, so the stages every seed shares (data, gold, judge, SFT) are computed
once; each set's summary is copied to OUT/summary-<set>.json. A verdict that holds (or fails) in one set of seeds
and not in the other is a finding that rests on which seeds were drawn. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs=2, default=["0,1,2", "3,4,5"], help="two comma-separated seed sets")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--out", default="/tmp/demo-claims")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    from r2q.demo import DemoConfig, run

    out = Path(args.out)
    summaries = []
    for seeds in args.sets:
        t0 = time.perf_counter()
        s = run(DemoConfig(out=str(out), profile=args.profile, seeds=seeds, quiet=True, workers=args.workers))
        tag = seeds.replace(",", "-")
        shutil.copy(out / "summary.json", out / f"summary-{tag}.json")
        print(f"seeds {seeds}: {time.perf_counter() - t0:.0f}s this call, {s['seconds_compute']:.0f}s of stage "
              f"compute (reused: {len(s['reused_stages'])} stages)", flush=True)
        summaries.append(s)
    a, b = ({c["id"]: c for c in s["claims"]} for s in summaries)
    agree = 0
    print(f"\n| claim | seeds {args.sets[0]} | seeds {args.sets[1]} | agree |\n| --- | --- | --- | --- |")
    for cid, ca in a.items():
        cb = b[cid]
        same = ca["verdict"] == cb["verdict"]
        agree += same
        print(f"| {cid} | {_cell(ca)} | {_cell(cb)} | {'yes' if same else 'NO'} |")
    print(f"\n{agree} of {len(a)} verdicts agree between the two sets of seeds")
    (out / "agreement.json").write_text(json.dumps({"sets": args.sets, "agree": agree, "claims": len(a),
                                                     "verdicts": {k: [a[k]["verdict"], b[k]["verdict"]] for k in a}},
                                                    indent=1))
    return 0


def _cell(c: dict) -> str:
    r = c.get("range")
    return c["verdict"] + (f" ({r[0]:.3g} to {r[1]:.3g})" if r else "")


if __name__ == "__main__":
    sys.exit(main())
