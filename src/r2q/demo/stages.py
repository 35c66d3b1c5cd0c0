"""Run-once stages with provenance: each stage's results are cached under its directory with a key that hashes
the settings, the seed, the keys of the stages it reads, the r2q version and the source code it runs, so a change
to any of them computes the stage again, and `stage.json` records the commit, the code hash and the seconds of
the run that computed it."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .common import jsonable

PACKAGE = Path(__file__).resolve().parents[1]  # src/r2q


def _module_file(name: str, root: Path = PACKAGE) -> Path | None:
    """The file of r2q module `name` ("r2q.demo.lm"), or None when it is not one of r2q's."""
    parts = name.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(path: Path, name: str, root: Path) -> set[str]:
    """The modules of the package that the file of module `name` imports by name, anywhere in it (top level or
    inside a function). `from .x import y` counts x.y when that is a module, else x. The parent packages that
    Python also runs on the way are not followed: their re-exports are not code the importing module uses."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[: len(parent) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names if _module_file(f"{mod}.{a.name}", root)}
            found |= subs if subs else {mod}
    return {m for m in found if _module_file(m, root) is not None}


def source_files(module: str, root: Path = PACKAGE) -> list[Path]:
    """The source files that module `module` of the package at `root` runs: its own and those of every module of
    the package it imports, transitively, read from the import statements."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name, root)
        if name in seen or path is None:
            continue
        seen[name] = path
        todo += sorted(_imports(path, name, root))
    return sorted(seen.values())


@functools.cache
def source_hash(module: str, root: Path = PACKAGE) -> str:
    """sha256 of the source `module` runs (see source_files), so any edit to that code changes it."""
    h = hashlib.sha256()
    for p in source_files(module, root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def commit() -> str:
    """The git commit of r2q's source, with '+dirty' when r2q's files differ from it ('unknown' outside git)."""
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, cwd=PACKAGE)
        head = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--", "."]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


@functools.cache
def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


def _machine() -> dict[str, object]:
    """Where a stage ran, for its record (not its key): the same code and libraries can round differently on
    another CPU (torch picks its kernels by the instruction set), so a number that moves between runs is traced."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


@dataclass(frozen=True)
class Stage:
    """One stage: `fn(ctx, directory) -> JSON-able dict`, reading the stages named in `deps` (shared stages by
    name; a per-seed stage's own seed's stages by name too). `per_seed`: run once per seed."""

    name: str
    fn: Callable[..., dict[str, Any]]
    deps: tuple[str, ...] = ()
    per_seed: bool = False

    @property
    def module(self) -> str:
        """The module whose code the stage runs (a functools.partial's function's)."""
        return getattr(self.fn, "func", self.fn).__module__


@dataclass
class StageRecord:
    """What a stage's stage.json holds."""

    key: str
    seconds: float
    result: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


class Stages:
    """The stages of one demo directory: their keys, and their cached records."""

    def __init__(self, root: Path, settings: dict[str, Any], stages: list[Stage]):
        self.root, self.settings = root, settings
        self.by_name = {s.name: s for s in stages}
        self.order = [s.name for s in stages]  # a topological order: deps come first
        self._keys: dict[tuple[str, int | None], str] = {}

    def dir(self, name: str, seed: int | None) -> Path:
        return self.root / name if seed is None or not self.by_name[name].per_seed else \
            self.root / f"seed-{seed}" / name

    def key(self, name: str, seed: int | None) -> str:
        st = self.by_name[name]
        seed = seed if st.per_seed else None
        if (name, seed) not in self._keys:
            parts = {"settings": self.settings, "stage": name, "seed": seed, "r2q": __version__,
                     "code": source_hash(st.module), "libraries": _library_versions(),
                     "deps": [self.key(d, seed) for d in st.deps]}
            self._keys[name, seed] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                                                    ).hexdigest()[:16]
        return self._keys[name, seed]

    def cached(self, name: str, seed: int | None) -> StageRecord | None:
        marker = self.dir(name, seed) / "stage.json"
        if not marker.exists():
            return None
        rec = StageRecord(**json.loads(marker.read_text()))
        return rec if rec.key == self.key(name, seed) else None

    def compute(self, name: str, seed: int | None, ctx) -> StageRecord:
        """Run the stage now and write its stage.json (renamed into place: an interrupted stage leaves none)."""
        st = self.by_name[name]
        d = self.dir(name, seed)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = st.fn(ctx, d)
        dt = time.perf_counter() - t0
        rec = StageRecord(self.key(name, seed), dt, result, {
            "commit": commit(), "code": source_hash(st.module), "r2q": __version__,
            "libraries": _library_versions(), "machine": _machine(), "seed": seed if st.per_seed else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        tmp = d / "stage.json.tmp"
        tmp.write_text(json.dumps(rec.__dict__, indent=1, default=jsonable))
        tmp.replace(d / "stage.json")
        return rec
