"""Checkpoints in formats users know, written atomically, with no pickle anywhere.

A checkpoint directory holds the HF model (`save_pretrained`, safetensors), the tokenizer, and the trainer
state: `optimizer.safetensors` (optimizer tensors) with `trainer_state.json` (step, scheduler, param groups,
config) and `rng-<rank>.safetensors` (torch RNG state per process). It is written to a temp dir and renamed
into place, so a directory named `step-*` is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into named tensors (for safetensors) and plain JSON values."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root/checkpoints, oldest first."""
    d = Path(root) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE).exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict[str, Any],
                    keep_last: int, is_main: bool, rank: int, wait) -> Path:
    """Write root/checkpoints/step-N atomically and prune to the newest `keep_last` ones.

    Every process writes its RNG state into the temp dir; the main process writes the rest and renames.
    `wait` is a barrier across processes.
    """
    ckdir = Path(root) / "checkpoints"
    final = ckdir / f"step-{step:07d}"
    tmp = ckdir / f".tmp-step-{step:07d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait()
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-{rank}.safetensors"))
    if is_main:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors, meta = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        full = dict(state, step=step, optimizer=meta, scheduler=scheduler.state_dict())
        (tmp / STATE).write_text(json.dumps(full, indent=1, default=str))
    wait()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    wait()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and this process's RNG; returns the trainer state."""
    from safetensors.torch import load_model

    path = Path(path)
    state = json.loads((path / STATE).read_text())
    files = sorted(path.glob("model*.safetensors"))
    if len(files) == 1:
        load_model(model, str(files[0]), strict=False)
    else:  # sharded
        for f in files:
            model.load_state_dict(load_file(str(f)), strict=False)
    load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng-{rank}.safetensors"
    if rng.exists():
        torch.set_rng_state(load_file(str(rng))["torch"])
    return state
