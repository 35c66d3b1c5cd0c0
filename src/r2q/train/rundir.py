"""A run's output directory: what an earlier run left there, removing it for --overwrite, refusing to train in
place, and trimming metrics.jsonl to the checkpoint being resumed. The lock that keeps two runs apart is
`paths.RunLock`; the record that describes the final model is `record`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import list_checkpoints, read_state
from ..config import flag
from ..errors import UserError, note
from ..paths import write_atomic
from ..record import RECORD
from .config import FREE_ON_RESUME


def truncate_metrics(path: Path, step: int, is_main: bool, note=note) -> None:
    """Drop lines logged after the checkpoint being resumed, so the file reads as one clean run; a line cut
    short (the process was killed while writing it) is dropped with a note."""
    if not is_main or not path.exists():
        return
    keep = []
    for n, ln in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            m = json.loads(ln)
            s = m["step"]
        except (ValueError, KeyError, TypeError):
            if ln.strip():
                note(f"{path} line {n}: not a complete metrics line (cut short by a kill?); dropped")
            continue
        if isinstance(s, int) and s <= step:
            keep.append(ln)
    write_atomic(path, "".join(ln + "\n" for ln in keep))


# what a run writes in --out (besides checkpoints/ and metrics.jsonl): removed by --overwrite before it starts
RUN_FILES = (RECORD, "model*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
             "adapter_config.json", "config.json", "generation_config.json", "tokenizer*.json",
             "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json",
             "README.md")


def earlier_run(out: Path) -> list[str]:
    """What of an earlier run `out` holds: checkpoints, metrics, final weights or a run record."""
    found = (["checkpoints"] if list_checkpoints(out) else []) + \
        (["metrics.jsonl"] if (out / "metrics.jsonl").exists() else [])
    weights = [p.name for p in out.glob("*.safetensors")] if out.is_dir() else []
    return found + weights[:2] + ([RECORD] if (out / RECORD).exists() else [])


def check_earlier_run(out: Path) -> None:
    """A fresh run must not mix with (or silently delete) an earlier run's checkpoints, metrics or weights."""
    if not out.is_dir():
        return
    found = earlier_run(out)
    if found:
        raise UserError(f"--out {out} holds an earlier run ({', '.join(found)}); continue it with --resume, "
                        "start over with --overwrite, or choose another --out")


def check_resumable(out: Path) -> None:
    """--resume continues from a checkpoint, or starts a run that never wrote one (killed before it) over. A
    finished run with no checkpoint (it ran without --save-every) has nothing to continue from, and starting over
    would replace its weights silently: refused."""
    if out.is_dir() and (out / RECORD).exists() and not list_checkpoints(out):
        raise UserError(f"--resume: --out {out} holds a finished run ({', '.join(earlier_run(out))}) and no "
                        "checkpoint to continue from (it wrote none: no --save-every, or fewer steps than it): start "
                        "over with --overwrite, or choose another --out")


def check_resume_settings(out: Path, now: dict[str, Any]) -> None:
    """The newest readable checkpoint's settings against this run's (`now`: the recorded config), before any data
    or weights load; the inputs' fingerprints are compared once they are computed (Trainer._check_same_run)."""
    first = None  # (the newest readable checkpoint, what differs): refused only when no readable one matches, since
    for ck in reversed(list_checkpoints(out)):  # a damaged newest one is skipped later in favour of an older one
        state, why = read_state(ck)
        if why is None:
            diff = resume_changes(state, now, {})[1]
            if not diff:
                return
            first = first or (ck, diff)
    if first:
        refuse_changes(*first)


def refuse_changes(ck: Path, diff: list[str]) -> None:
    if diff:
        raise UserError(f"--resume: {ck} was written by a run with other settings: {'; '.join(diff)}. Resume with "
                        "the same settings and inputs, or start over with --overwrite")


def clear_run(out: Path) -> None:
    """Remove every file an earlier run wrote in `out`: the record first (so that no half-removed directory is
    described by it), then weights, tokenizer, adapter, checkpoints and metrics. Other files are left alone."""
    (out / RECORD).unlink(missing_ok=True)
    for pattern in RUN_FILES[1:]:
        for p in out.glob(pattern):
            p.unlink()
    for d in (out / "adapter", out / "checkpoints"):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def check_not_in_place(out: Path, model: str, ref: str) -> None:
    """Training into the directory the weights come from would overwrite them (and make the model its own
    reference): --out must differ from --model and --ref (paths the run loads; "" for none), symlinks resolved."""
    if model and _same(out, model):
        raise UserError(f"--out {out} is the --model directory; training there would overwrite the starting weights "
                        "(and the trained model would be its own reference): choose another --out")
    if ref and _same(out, ref):
        raise UserError(f"--out {out} is the --ref directory; training there would overwrite the reference: choose "
                        "another --out")
    for name, path in (("--model", model), ("--ref", ref)):  # e.g. a checkpoint of an earlier run in this --out
        parents = Path(path).resolve().parents if path and Path(path).exists() else ()
        if any((Path(out) / d).resolve() in parents for d in ("checkpoints", "adapter")):
            raise UserError(f"{name} {path} lies inside the checkpoints or adapter of --out {out}, which the run "
                            "writes, prunes and (with --overwrite) removes: copy it out of there first, or choose "
                            "another --out")
    for d in (out / "checkpoints", out / "adapter"):  # a run writes into these, and prunes old checkpoints in one
        if d.is_symlink():
            raise UserError(f"{d} is a symbolic link; r2q writes checkpoints and adapters only into real directories "
                            "under --out (and would delete old checkpoints wherever the link points): remove it")


def resume_changes(state: dict[str, Any], now: dict[str, Any], inputs: dict[str, str | None]
                   ) -> tuple[list[str], list[str]]:
    """What differs between the run that wrote a checkpoint (its `state`: recorded config and inputs) and this one
    (`now`: the recorded config; `inputs`: the fingerprints): (changes of length, which resuming allows; every
    other change of a setting or of an input's content, which it refuses), each as 'option old -> new' lines."""
    saved = state.get("config", {})
    changed = [k for k in now if k not in FREE_ON_RESUME and saved.get(k) != now[k]]
    said = {k: f"{flag(k)} {saved.get(k)!r} -> {now[k]!r}" for k in changed}
    longer = [k for k in changed if k in ("max_steps", "epochs")]
    return [said[k] for k in longer], [said[k] for k in changed if k not in longer] + \
        _changed_inputs(state, now, inputs)


def _changed_inputs(state: dict[str, Any], cfg: dict[str, Any], inputs: dict[str, str | None]) -> list[str]:
    """The inputs whose content differs from what checkpoint `state` recorded (by fingerprint)."""
    saved = dict(state.get("inputs") or {})
    saved.setdefault("data", state.get("data_hash"))  # checkpoints of r2q before the inputs table
    start = f"the starting model --model {cfg['model']}"
    what = {"data": "the training data (its tokens differ)",
            "tokenizer": "the tokenizer (its vocabulary differs)",
            "reference": f"{start}, the reference of --ref init (its weights changed)" if cfg["ref"] == "init"
            else f"the reference --ref {cfg['ref']} (its weights changed)",
            "model": f"{start}, the base of the LoRA adapters (its weights changed)"}
    keys = ["data", "tokenizer", "reference"] + (["model"] if cfg["lora_r"] and cfg["ref"] != "init" else [])
    return [what[k] for k in keys if saved.get(k) and inputs.get(k) and saved[k] != inputs[k]]
