"""How long the command line takes to answer when it has nothing to load: --help, version and option errors.

Each command runs in a fresh interpreter exactly as the `r2q` console script does (`r2q.cli:main`); the time is the
subprocess's wall time, the median of --runs rounds, the commands interleaved within each round so that a busy
machine slows them alike. `python -c "import torch"` is the contrast: what every command used to pay first.

    python benchmarks/cli_startup.py                             # the r2q on sys.path
    python benchmarks/cli_startup.py --before /tmp/before/src    # and, interleaved with it, another checkout's
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRY = "import sys; from r2q.cli import main; sys.argv[0] = 'r2q'; main()"  # what the console script runs


def cases(tmp: Path) -> dict[str, list[str]]:
    bad = tmp / "bad.json"
    bad.write_text(json.dumps({"beta": 0.1, "no_such_option": 1}))
    r2q = [sys.executable, "-c", ENTRY]
    return {
        "r2q --help": [*r2q, "--help"],
        "r2q train --help": [*r2q, "train", "--help"],
        "r2q generate --help": [*r2q, "generate", "--help"],
        "r2q version": [*r2q, "version"],
        "r2q train --beta -1 (bad value)": [*r2q, "train", "--model", "m", "--data", "d.jsonl", "--out", "o",
                                            "--beta", "-1"],
        "r2q train --config bad.json (unknown key)": [*r2q, "train", "--config", str(bad)],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }


def where(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", "import r2q; print(r2q.__file__)"], capture_output=True, text=True,
                          check=True, env=env).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--before", default="", help="src/ of another checkout, timed interleaved with this one")
    args = ap.parse_args()
    envs = {"now": dict(os.environ)}
    if args.before:
        envs = {"before": {**os.environ, "PYTHONPATH": args.before}, "after": envs["now"]}
    for label, env in envs.items():
        print(f"{label}: r2q from {where(env)}")
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPU cores; median of {args.runs} interleaved runs")
    labels = list(envs)
    with tempfile.TemporaryDirectory() as d:
        todo = cases(Path(d))
        # each r2q command under every checkout; the plain interpreter runs (the contrast) once
        runs = [(name, label) for name in todo for label in (labels if name.startswith("r2q") else labels[-1:])]
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        codes: dict[tuple[str, str], int] = {}
        for i in range(args.runs):
            for name, label in runs[i % len(runs):] + runs[: i % len(runs)]:  # a different order each round
                t0 = time.perf_counter()
                r = subprocess.run(todo[name], capture_output=True, cwd=d, env=envs[label])
                times[(name, label)].append(time.perf_counter() - t0)
                codes[(name, label)] = r.returncode
    width = max(len(name) for name in todo)
    print(f"| {'command':<{width}} | " + " | ".join(f"{c}: median s (min)" for c in labels) + " | exit |")
    print(f"| {'-' * width} | " + " | ".join("---:" for _ in labels) + " | ---: |")
    for name in todo:
        mine = [(n, c) for n, c in runs if n == name]
        cells = [f"{statistics.median(times[k]):.2f} ({min(times[k]):.2f})" for k in mine]
        cells = cells if len(cells) == len(labels) else cells * len(labels)  # the contrast: one interpreter
        exits = " / ".join(dict.fromkeys(str(codes[k]) for k in mine))
        print(f"| {name:<{width}} | " + " | ".join(cells) + f" | {exits} |")

if __name__ == "__main__":
    main()
