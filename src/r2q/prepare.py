"""Turning loaded weights into a training setup: LoRA adapters, dropout, gradient checkpointing and FSDP2 sharding
of the model; the optimizer and the learning-rate schedule. Each is a function of its options, so the trainer
reads as a list of these calls and each is tested on its own."""

from __future__ import annotations

import warnings

import torch

from .errors import UserError, first_line
from .models import disable_dropout, quiet_deprecations

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # r2q -> transformers


def with_lora(model, r: int, alpha: float, dropout: float, target_modules: str):
    """The model with LoRA adapters (PEFT) on `target_modules` ("all-linear", or comma-separated module names);
    only the adapters train."""
    from peft import LoraConfig, get_peft_model  # optional and slow to import: only when LoRA is asked for

    target: str | list[str] = target_modules if target_modules == "all-linear" else \
        [t.strip() for t in target_modules.split(",")]
    if isinstance(target, list):
        check_targets(model, target)
    try:
        with quiet_deprecations(), warnings.catch_warnings():
            # gpt2's Conv1D: PEFT sets fan_in_fan_out itself and says so; the adapters are right either way
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is")
            return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                    target_modules=target, task_type="CAUSAL_LM"))
    except ValueError as e:  # e.g. a target module the model does not have
        raise UserError(f"--lora-target-modules {target_modules}: {first_line(e)}") from e


def check_targets(model, targets: list[str]) -> None:
    """Every name of --lora-target-modules names modules of the model, matched as PEFT matches a name (the
    module's full name, or its last parts): PEFT refuses a list none of whose names match, but skips a name that
    matches nothing when another does, and writes it into adapter_config.json."""
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not t:
            raise UserError("--lora-target-modules has an empty name (a stray comma?)")
        if not any(n == t or n.endswith("." + t) for n in names):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
            raise UserError(f"--lora-target-modules: {t!r} matches no module of {type(model).__name__} (its linear "
                            f"layers: {', '.join(linear)}; or all-linear)")


def gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, so frozen inputs are fine)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    with quiet_deprecations():  # transformers renames it activation checkpointing; both run the same code
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable(model, *, lora: tuple[int, float, float, str] | None = None, keep_dropout: bool = True,
              checkpointing: bool = False):
    """The model as it trains: no KV cache, LoRA adapters when `lora` = (r, alpha, dropout, targets), dropout off
    unless `keep_dropout` (DPO turns it off, as TRL does), and gradient checkpointing when asked."""
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if lora:
        model = with_lora(model, *lora)
    if not keep_dropout:
        disable_dropout(model)
    if checkpointing:
        gradient_checkpointing(model)
    return model


def shard(model) -> int:
    """FSDP2 over the default process group: one unit per decoder layer (the classes the model names in
    _no_split_modules), then the rest of the model. Returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    units = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise UserError(f"--fsdp: {type(model).__name__} does not name its decoder layers (_no_split_modules)")
    for m in layers:
        fully_shard(m)
    fully_shard(model)
    return len(layers) + 1


def optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (fused: one kernel for all tensors) with weight decay on matrices only, not on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def schedule(opt: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """Linear warm-up over `warmup_steps`, then `name` (linear or cosine decay to 0, or constant) to `total_steps`."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[name], opt, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
