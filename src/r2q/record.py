"""The run record: what a `r2q train` output directory was trained from and against, by path and by content.

`r2q_config.json` holds the run's settings (local paths made absolute) and an `inputs` table of content
fingerprints: the starting model's weights, the reference's, the tokenizer's vocabulary and the training tokens.
The trainer writes it last, after the model it describes, and checkpoints carry the same table, so `--resume`
refuses inputs that changed and `credit` / `generate` can tell when the reference they load is no longer the one
the policy was trained against. This module is the only one that writes or reads the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .paths import write_atomic

RECORD = "r2q_config.json"
_WEIGHT_FILES = ("*.safetensors", "config.json", "adapter_config.json")


def model_fingerprint(path: str | os.PathLike, _seen: frozenset[str] = frozenset()) -> str | None:
    """sha256 of a local model directory's weights and config (every *.safetensors, config.json and
    adapter_config.json, by name and content); for a LoRA adapter also its base's. None for a hub id or a path
    that is not a directory (nothing local to fingerprint)."""
    p = Path(path)
    if not p.is_dir():
        return None
    key = str(p.resolve())
    if key in _seen:
        raise UserError(f"{p}: the LoRA adapter names itself (or an adapter that names it) as its base model")
    h = hashlib.sha256()
    for f in sorted({f for pat in _WEIGHT_FILES for f in p.glob(pat) if f.is_file()}):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    adapter = p / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError, AttributeError):
            base = ""
        h.update(b"base\0" + (model_fingerprint(base, _seen | {key}) or base).encode())
    return h.hexdigest()


@dataclass
class Record:
    """A run's r2q_config.json: its settings and its inputs' fingerprints."""

    config: dict[str, Any]
    inputs: dict[str, str | None] = field(default_factory=dict)
    path: Path | None = None

    def recorded_reference(self) -> str:
        """The reference as recorded ('' if none, 'none' for reference-free), whatever kind of path it is."""
        ref = self.config.get("ref") or ""
        return (self.config.get("model") or "") if ref == "init" else ref

    def reference(self) -> str:
        """The reference path the run trained against, to load it by ('' if it recorded none, 'none' for
        reference-free). A relative path (written by an older r2q, relative to wherever train ran: it may name
        another model from here) is a UserError; a hub id (ORG/NAME, not a local path) is returned as it is."""
        ref = self.recorded_reference()
        if ref and ref != "none" and _relative(ref, self.old()):
            raise UserError(f"{self.path} records the reference as the relative path {ref!r}, which depends on the "
                            "directory train ran in; pass --ref")
        return ref

    def old(self) -> bool:
        """Written by an r2q that recorded paths as given (relative ones too): its --out is not absolute."""
        return not Path(str(self.config.get("out") or "")).is_absolute()

    def beta(self) -> float | None:
        b = self.config.get("beta")
        return float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) else None

    def reference_fingerprint(self) -> str | None:
        return self.inputs.get("reference")


def recorded_config(config: dict[str, Any], mode: str) -> dict[str, Any]:
    """A run's settings as the record and its checkpoints keep them: local paths made absolute, so `credit` and
    `--resume` find the same files from any directory (a hub id is not a path: kept as given)."""
    d = dict(config, mode=mode)
    # not a setting of the run (resume may change it) and not one to hand on: a record passed as --config, or shipped
    # with the model, must not turn on running a directory's code
    d.pop("trust_remote_code", None)
    for k in ("model", "data", "ref", "eval_data", "cache_dir", "out"):
        if d.get(k) and Path(d[k]).exists():
            d[k] = str(Path(d[k]).resolve())
    return d


def write_record(out: str | os.PathLike, config: dict[str, Any], inputs: dict[str, str | None]) -> Path:
    """DIR/r2q_config.json, atomically: the settings, with the input fingerprints under `inputs`."""
    return write_atomic(Path(out) / RECORD, json.dumps(dict(config, inputs=inputs), indent=1))


def read_record(model: str | os.PathLike) -> Record | None:
    """The record beside a trained model, or None when the directory has none."""
    p = Path(model) / RECORD
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        if not isinstance(d, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{p}: damaged (not a JSON object); pass --ref and --beta to do without it") from None
    for key, ok, what in (("model", str, "a path"), ("ref", str, "a path"), ("beta", (int, float), "a number")):
        v = d.get(key)
        if v is not None and (not isinstance(v, ok) or isinstance(v, bool)):
            raise UserError(f"{p}: damaged ({key!r} is {v!r}, not {what}); pass --ref and --beta to do without it")
    inputs = d.pop("inputs", {}) or {}
    return Record(d, inputs if isinstance(inputs, dict) else {}, p)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _relative(ref: str, old: bool) -> bool:
    """Whether a recorded reference is a relative local path: not absolute, and a path that exists from here, or one
    that cannot be a hub id (ORG/NAME), or any path with a "/" in a record of an older r2q (`old`), which recorded
    local paths as given; a record of this one makes every existing local path absolute, so ORG/NAME there is a hub
    id."""
    if Path(ref).is_absolute():
        return False
    return Path(ref).exists() or ("/" in ref and (old or not _HUB_ID.fullmatch(ref)))


def reference_changed(rec: Record | None, ref: str) -> str | None:
    """When `ref` is the reference the record names and its content no longer matches the recorded fingerprint:
    the sentence that says so; else None (nothing recorded, another reference given, or unchanged)."""
    if rec is None or not rec.reference_fingerprint() or ref in ("", "none"):
        return None
    recorded = rec.recorded_reference()
    if not recorded or _relative(recorded, rec.old()) or Path(ref).resolve() != Path(recorded).resolve():
        return None
    now = model_fingerprint(ref)
    if now is None or now == rec.reference_fingerprint():
        return None
    return (f"the reference {ref} has changed since {rec.path.parent if rec.path else 'the run'} was trained against "
            "it (its weights' fingerprint differs); the implicit rewards are against the reference as it is now")
