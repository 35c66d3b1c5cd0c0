"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task, end to end, from scratch, in
several seeds.

Stages (each cached under DIR/<stage>/ or DIR/seed-<s>/<stage>/ with a key of the settings, the seed, the code it
runs and the stages it reads; a second run reuses them):
  shared by every seed (Profile.data_seed):
    data      IMDb reviews split into gold / held-out / LM text, cut into passages of whole sentences; a BPE
              tokenizer; prompts (the starts of held-out passages); Rotten Tomatoes snippets
    gold      the gold reward: TF-IDF + logistic regression on the gold reviews
    judge     a fluency judge: an LM like the policy's, trained on passages of the gold reviews
    sft       the SFT policy: a small Llama-style LM on passages, each followed by EOS
    eos       does the SFT policy end by content? samples after prompts of several lengths
  per seed:
    pairs     K samples per prompt from the SFT policy; the best and the worst by gold make a pair (Bradley-Terry
              labels), the widest gaps kept; Rotten Tomatoes pairs under one shared prompt; shuffled-label copies
    dpo-*     a: SFT on the chosen side, then DPO with it as reference; b: DPO from the SFT policy (the main
              policy); shuffled: b on shuffled labels (a null); -rt: the same on Rotten Tomatoes; b at other betas
    credit    finding 1: per-token rewards against gold word weights, the edit test with placebo swaps
    search    finding 2: sampling, greedy, beams at two length penalties, reward-beam, best-of-N, MCTS, guided;
              every searching method at equal compute
    dynamics  finding 3: rewards along training, held-out and on training batches; KL(pi_ref||pi)
Then DIR/summary.json (per-seed results, the claims with per-seed intervals and a verdict across seeds, and each
stage's provenance), DIR/report.html and the claims in the terminal.

DIR is new, empty or an earlier demo's (see outdir.py: a directory holding anything else is refused before any
stage), marked DIR/.r2q-demo, and locked (DIR/.lock) for the whole run, so that two demos never write one DIR.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..paths import RunLock, write_atomic
from .claims import claims
from .common import jsonable
from .config import DemoConfig, parse_seeds
from .credit import stage_credit
from .dpo import DPORun, dpo_plan, stage_dpo, stage_pairs
from .dynamics import stage_dynamics
from .eos import stage_eos
from .lm import stage_judge, stage_sft
from .outdir import check_demo_out, mark
from .profile import PROFILES, Profile
from .report import terminal_table, write_report
from .search import stage_search
from .stages import Stage, StageRecord, Stages
from .text import stage_data, stage_gold


def stage_list(p: Profile) -> list[Stage]:
    """Every stage, each after the stages it reads."""
    runs = dpo_plan(p)
    out = [Stage("data", stage_data), Stage("gold", stage_gold, ("data",)), Stage("judge", stage_judge, ("data",)),
           Stage("sft", stage_sft, ("data",)), Stage("eos", stage_eos, ("data", "sft")),
           Stage("pairs", stage_pairs, ("data", "sft", "gold"), per_seed=True)]
    out += [Stage(name, partial(stage_dpo, spec=spec), ("pairs", "sft"), per_seed=True) for name, spec in runs.items()]
    reads = ("data", "gold", "sft", *runs)
    out += [Stage("credit", stage_credit, reads, per_seed=True),
            Stage("search", stage_search, (*reads, "judge"), per_seed=True),
            Stage("dynamics", stage_dynamics, reads, per_seed=True)]
    return out


@dataclass
class Ctx:
    """What a stage sees: where the stages it reads live, the profile, its seed."""

    stages: Stages
    profile: Profile
    seed: int | None
    quiet: bool

    def dir(self, name: str) -> Path:
        return self.stages.dir(name, self.seed)

    def runs(self) -> dict[str, DPORun]:
        """This seed's DPO runs."""
        return {name: DPORun(**json.loads((self.dir(name) / "stage.json").read_text())["result"])
                for name in dpo_plan(self.profile)}


def _compute(out: str, profile: str, seed: int | None, name: str, quiet: bool, threads: int) -> StageRecord:
    """Run one stage (in a worker process when several run side by side)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    p = PROFILES[profile]
    st = Stages(Path(out), p.settings(), stage_list(p))
    return st.compute(name, seed, Ctx(st, p, seed, quiet))


class _Runner:
    """Runs the stages not yet cached, in order, `workers` at a time, and keeps every stage's record."""

    def __init__(self, st: Stages, cfg: DemoConfig, seeds: tuple[int, ...], console):
        self.st, self.cfg, self.seeds, self.console = st, cfg, seeds, console
        self.records: dict[tuple[str, int | None], StageRecord] = {}
        self.reused: list[str] = []

    def jobs(self) -> list[tuple[str, int | None]]:
        return [(n, s) for n in self.st.order for s in (self.seeds if self.st.by_name[n].per_seed else (None,))]

    def deps(self, job: tuple[str, int | None]) -> list[tuple[str, int | None]]:
        name, seed = job
        return [(d, seed if self.st.by_name[d].per_seed else None) for d in self.st.by_name[name].deps]

    def run(self) -> None:
        todo = []
        for job in self.jobs():
            rec = self.st.cached(*job)
            if rec is None:
                todo.append(job)
            else:
                self.records[job] = rec
                self.reused.append(_where(job))
        if self.reused:
            self.console.print(f"[dim]cached: {', '.join(self.reused)}[/]")
        workers = min(self.cfg.workers or min(os.cpu_count() or 1, 4), max(1, len(todo)))
        if workers == 1:
            for job in todo:
                self._done(job, _compute(self.cfg.out, self.cfg.profile, job[1], job[0], self.cfg.quiet, 0))
            return
        self._parallel(todo, workers)

    def _parallel(self, todo: list[tuple[str, int | None]], workers: int) -> None:
        """Stages side by side in `workers` processes: the ready stage of highest priority first, one thread each,
        except a stage that runs alone (the SFT policy's training, or the only stage left to run), which gets
        every core: training gains from threads, decoding these small models does not."""
        cores = os.cpu_count() or 1
        rank = {n: i for i, n in enumerate(_priority(self.st.order))}
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            running: dict[Any, tuple[str, int | None]] = {}
            while todo or running:
                ready = sorted((j for j in todo if all(d in self.records for d in self.deps(j))),
                               key=lambda j: rank[j[0]])
                for job in ready:
                    alone = job[0] in EXCLUSIVE or (len(ready) == 1 and not running)
                    if len(running) >= workers or (running and job[0] in EXCLUSIVE) or \
                            any(r[0] in EXCLUSIVE for r in running.values()):
                        break
                    todo.remove(job)
                    threads = cores if alone else max(1, cores // workers)
                    running[pool.submit(_compute, self.cfg.out, self.cfg.profile, job[1], job[0], True,
                                        threads)] = job
                    if job[0] in EXCLUSIVE:
                        break
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for f in finished:
                    self._done(running.pop(f), f.result())

    def _done(self, job: tuple[str, int | None], rec: StageRecord) -> None:
        self.records[job] = rec
        nums = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.result.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))[:200]
        self.console.print(f"[green]{_where(job)}[/] done in {rec.seconds:.0f}s  {nums}", highlight=False)


EXCLUSIVE = ("sft",)  # runs alone with every core: the longest training, on the path of every later stage


def _priority(order: list[str]) -> list[str]:
    """Stages in the order a free worker takes them when several are ready: the path to the DPO runs first, then
    the longest per-seed stage (search), so that the last stages to finish are short ones."""
    first = ["data", "gold", "sft", "pairs", "judge", "eos"]
    last = ["search", "credit", "dynamics"]
    return first + [n for n in order if n not in first + last] + last


def _where(job: tuple[str, int | None]) -> str:
    name, seed = job
    return name if seed is None else f"{name} (seed {seed})"


def summarize(st: Stages, runner: _Runner, profile: Profile, seeds: tuple[int, ...], wall: float) -> dict[str, Any]:
    """summary.json: the shared stages' results, each seed's results, the claims, timings and provenance."""
    rec = runner.records
    shared = {n: rec[(n, None)].result for n in st.order if not st.by_name[n].per_seed}
    per_seed: dict[str, dict[str, Any]] = {}
    runs = list(dpo_plan(profile))
    for s in seeds:
        r = {n: rec[(n, s)].result for n in st.order if st.by_name[n].per_seed and n not in runs}
        r["dpo"] = {n: rec[(n, s)].result for n in runs}
        per_seed[str(s)] = r
    prov = {_where(j): dict(r.provenance, seconds=r.seconds) for j, r in rec.items()}
    summary = {"profile": profile.name, "seeds": list(seeds), "settings": profile.settings(),
               "shared_stages": [n for n in st.order if not st.by_name[n].per_seed],
               "seconds_this_run": wall, "seconds_compute": sum(r.seconds for r in rec.values()),
               "seconds_wall_stages": _span(rec.values()),
               "reused_stages": runner.reused, "provenance": prov, "shared": shared, "per_seed": per_seed}
    summary["claims"] = claims(summary)
    return summary


def _span(records) -> float:
    """Wall-clock seconds from the start of the first stage to the end of the last, whenever they ran (a demo run
    from a clean cache: its wall time, kept when a later run reuses the stages)."""
    from datetime import datetime

    ends = [(datetime.strptime(r.provenance["finished"], "%Y-%m-%dT%H:%M:%S%z").timestamp(), r.seconds)
            for r in records if r.provenance.get("finished")]
    return max(e for e, _ in ends) - min(e - s for e, s in ends) if ends else 0.0


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run (or reuse) every stage for every seed, write DIR/summary.json and DIR/report.html; returns the summary.
    DIR must be new, empty or an earlier demo's, and is locked for the run: a second demo on it stops at once."""
    p = PROFILES[cfg.profile]
    seeds = parse_seeds(cfg.seeds) or p.seeds
    out = check_demo_out(cfg.out)
    with RunLock(out):
        mark(out)
        return _run(cfg, out, p, seeds)


def _run(cfg: DemoConfig, out: Path, p: Profile, seeds: tuple[int, ...]) -> dict[str, Any]:
    from rich.console import Console
    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per stage, not a bar per model load
    console = Console()
    t0 = time.perf_counter()
    st = Stages(out, p.settings(), stage_list(p))
    runner = _Runner(st, cfg, seeds, console)
    runner.run()
    summary = summarize(st, runner, p, seeds, time.perf_counter() - t0)
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=jsonable))
    report = write_report(out, summary)
    console.print(terminal_table(summary))
    console.print(f"report: {escape(str(report))}  ({summary['seconds_compute']:.0f}s of compute, "
                  f"{summary['seconds_this_run']:.0f}s this run)")
    return summary
