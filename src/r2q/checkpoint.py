"""Checkpoints in formats users know, written atomically, with no pickle anywhere.

A checkpoint directory holds the HF model (`save_pretrained`, safetensors), the tokenizer, and the trainer
state: `optimizer.safetensors` (optimizer tensors) with `trainer_state.json` (step, scheduler, param groups,
config) and `rng-<rank>.safetensors` (torch RNG state per process). It is written to a temp dir, then
`manifest.json` (every file's size and sha256) is written last, then the dir is renamed into place: a
`step-*` dir with a manifest was complete when written, and `verify` tells whether it still is.
Loading is strict: every tensor the model expects must be in the checkpoint, with its shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .paths import writing

STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_tensors(opt: torch.optim.Optimizer, state_dict: dict | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict (opt's own, or a given one: FSDP's full state dict, keyed by parameter name)
    into named tensors (for safetensors) and plain JSON values."""
    sd = opt.state_dict() if state_dict is None else state_dict
    sep = "." if all(isinstance(k, int) for k in sd["state"]) else "|"  # parameter names contain dots
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}{sep}{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}{sep}{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "sep": sep}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state_dict that `optimizer_tensors` split."""
    sep = meta.get("sep", ".")
    state: dict[Any, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.rsplit(sep, 1) if sep != "." else key.split(".", 1)
        state.setdefault(int(idx) if sep == "." else idx, {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs under root/checkpoints (complete when written or not: see `verify`), oldest first."""
    d = Path(root) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    (d / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def read_state(d: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A checkpoint's trainer_state.json as (state, None), or (None, what is wrong with it): the manifest vouches
    for its bytes, not for their being a state r2q wrote (a file edited and re-hashed, a writer of another tool)."""
    try:
        state = json.loads((d / STATE).read_text())
    except (OSError, ValueError) as e:
        return None, f"{STATE} cannot be read ({' '.join(str(e).split())[:120]})"
    if not isinstance(state, dict):
        state = {}
    step, inputs = state.get("step"), state.get("inputs")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(state.get("config"), dict) \
            or not (inputs is None or isinstance(inputs, dict)):
        return None, f"{STATE} is not the state of an r2q checkpoint (a step and tables of config and inputs)"
    return state, None


def verify(d: Path) -> str | None:
    """None if every file the manifest lists is there with its size and hash, else what is wrong."""
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest.json (an unfinished write, or a checkpoint of r2q < 0.2)"
    except (ValueError, KeyError, TypeError):
        return "manifest.json is damaged"
    for name, want in files.items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(p) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    if not any(n.startswith(("model", "adapter_model")) and n.endswith(".safetensors") for n in files):
        return "no model*.safetensors (or LoRA adapter_model.safetensors) weights"
    return None


def save_checkpoint(root: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict[str, Any],
                    keep_last: int, is_main: bool, rank: int, wait, model_state: dict | None = None,
                    optim_state: dict | None = None) -> Path:
    """Write root/checkpoints/step-N atomically and prune to the newest `keep_last` ones.

    Every process writes its RNG state into the temp dir; the main process writes the rest and renames.
    `wait` is a barrier across processes. model_state / optim_state: full state dicts gathered beforehand (FSDP,
    where the model and optimizer hold shards only).
    """
    ckdir = Path(root) / "checkpoints"
    final = ckdir / f"step-{step:07d}"
    tmp = ckdir / f".tmp-step-{step:07d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(final):
            tmp.mkdir(parents=True)
    wait()
    # a full disk is one line naming the checkpoint, and the half-written temp dir is removed
    with writing(final, cleanup=tmp):
        save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-{rank}.safetensors"))
        if is_main:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": model_state} if model_state else {}))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            tensors, meta = optimizer_tensors(optimizer, optim_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            full = dict(state, step=step, optimizer=meta, scheduler=scheduler.state_dict())
            (tmp / STATE).write_text(json.dumps(full, indent=1, default=str))
    wait()
    if is_main:
        with writing(final, cleanup=tmp):
            write_manifest(tmp)  # last: it vouches for every file the other ranks and this one wrote
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    wait()
    return final


def load_weights(model, d: Path) -> None:
    """Load model*.safetensors of d into model, strictly: every tensor the model has (tied copies aside) must be
    there with its shape, and nothing else. Checked before anything is copied; raises ValueError saying what
    is wrong."""
    if hasattr(model, "get_base_model"):  # a PEFT model: its checkpoints hold the adapters only
        return _load_adapter(model, Path(d))
    files = sorted(Path(d).glob("model*.safetensors"))
    if not files:
        raise ValueError("no model*.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    own = model.state_dict()
    saved_ptrs = {own[k].data_ptr() for k in sd if k in own}
    missing = [k for k in own if k not in sd and own[k].data_ptr() not in saved_ptrs]  # tied weights: saved once
    _check_fits("weights", sd, own, missing)
    if is_sharded(model):  # FSDP: every process loads the full tensors into its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(sd, strict=False)


def is_sharded(model) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _load_adapter(model, d: Path) -> None:
    """A PEFT model's adapter weights from d/adapter_model.safetensors, as strictly as `load_weights`."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    f = d / "adapter_model.safetensors"
    if not f.is_file():
        raise ValueError("no adapter_model.safetensors (a LoRA run's checkpoint)")
    sd, own = load_file(str(f)), get_peft_model_state_dict(model)
    _check_fits("adapter", sd, own, sorted(set(own) - set(sd)))
    set_peft_model_state_dict(model, sd)


def _check_fits(what: str, saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor], missing: list[str]) -> None:
    """Every tensor the model needs is saved (`missing` lists those that are not), nothing else is, and each has
    the model's shape; else a ValueError saying what is wrong."""
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        raise ValueError(f"the {what} do{'es' if what == 'adapter' else ''} not fit the model: {len(missing)} tensors "
                         f"missing {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}")
    for k, v in saved.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")


class StateMismatch(ValueError):
    """A checkpoint's optimizer or scheduler state that does not fit the run's (its weights did)."""


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and this process's RNG; returns the trainer state.
    Call `verify` first; raises ValueError (or a safetensors error) if the files do not fit the model."""
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    load_weights(model, path)
    try:
        osd = optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), osd,  # accelerate wraps it
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(osd)
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError) as e:  # intact files of another optimizer's making
        raise StateMismatch(f"its optimizer or scheduler state does not fit this run's "
                            f"({' '.join(str(e).split())[:160] or type(e).__name__})") from e
    rng = path / f"rng-{rank}.safetensors"
    if rng.exists():
        torch.set_rng_state(load_file(str(rng))["torch"])
    return state
