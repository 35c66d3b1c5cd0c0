"""The trainer: token-level DPO (and SFT) for any HF causal LM, resumable, distributed through accelerate.

One optimizer step consumes a global batch of `batch_size * processes * grad_accum` examples, split into
length-sorted micro-batches. Each process's loss is its share of the global mean (sum / global count *
processes, since DDP averages gradients), so any split of the same global batch gives the same update.
The data order is a function of (seed, epoch) only, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError

from . import refcache
from .checkpoint import STATE, list_checkpoints, load_checkpoint, save_checkpoint, verify
from .config import check_options, check_prompt_fits, flag, option
from .data import load_preferences, load_sft
from .errors import UserError, first_line, note
from .losses import LOSS_TYPES, dpo_loss, sft_loss
from .models import (
    check_model_path,
    check_vocab,
    disable_dropout,
    load_model,
    load_reference,
    load_tokenizer,
    pad_id,
    quiet_deprecations,
)
from .paths import RunLock, append_line, check_out_dir, save_into, write_atomic
from .progress import progress_bar
from .record import RECORD, model_fingerprint, write_record
from .rewards import implicit_rewards, sequence_rewards
from .tokens import TokenBatch, TokenScorer, completion_logps, examples_batch, pad_rows, shared_layout


@dataclass
class TrainConfig:
    """Options of `r2q train` (DPO) and `r2q sft`; the CLI is generated from these fields."""

    model: str = option("", "Policy to start from: a local HF model directory (or hub id when online)")
    data: str = option("", "Training data: .jsonl, .json, .parquet, .csv, a data set directory, or a hub data set "
                           "ORG/NAME (with --split, --subset)")
    split: str = option("train", "Split of --data when it is a data set (directory or hub)")
    subset: str = option("", "Configuration of a hub data set (datasets' name=), for --data and --eval-data")
    out: str = option("", "Output directory: final model, checkpoints/, metrics.jsonl")
    ref: str = option("init", "Reference policy: a model path, 'init' (frozen copy of the start) or 'none'")
    beta: float = option(0.1, "KL strength beta of the implicit reward beta*log pi/pi_ref", gt=0)
    loss: str = option("sigmoid", "DPO loss: sigmoid (DPO), ipo or cdpo (label-smoothed)", choices=LOSS_TYPES)
    label_smoothing: float = option(0.0, "cDPO label noise epsilon, in [0, 0.5) (--loss cdpo only)", ge=0, le=0.49)
    lr: float = option(5e-6, "Peak learning rate (AdamW)", gt=0)
    schedule: str = option("linear", "Learning-rate schedule after warm-up: linear, cosine or constant",
                       choices=("linear", "cosine", "constant"))
    warmup_steps: int = option(0, "Linear warm-up steps", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off)", ge=0)
    epochs: float = option(1.0, "Epochs over the data (ignored when --max-steps is set)", gt=0, le=1e6)
    max_steps: int = option(0, "Optimizer steps to run (0 = from --epochs)", ge=0)
    batch_size: int = option(8, "Examples (pairs) per micro-batch per process", ge=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step", ge=1)
    max_length: int = option(1024, "Max tokens of prompt + completion (longer: cut)", ge=2)
    max_prompt_length: int = option(512, "Max prompt tokens (cut from the left); less than --max-length", ge=1)
    share_prefix: bool = option(True, "One row per pair: run the prompt once for chosen and rejected")
    pack: int = option(0, "With prefix sharing: pack several pairs into rows of up to this many tokens (0: one row per "
                       "pair); less padding when pair lengths vary", ge=0)
    precompute_ref: bool = option(False, "Run the reference once, cache per-token log-probs on disk, free it")
    cache_dir: str = option("", "Reference log-prob cache dir (default $R2Q_CACHE or ~/.cache/r2q)")
    lora_r: int = option(0, "LoRA rank (0: train every weight). With LoRA and --ref init the reference is the same "
                         "model with its adapters off, not a second copy", ge=0)
    lora_alpha: float = option(16.0, "LoRA alpha: the adapter's update is scaled by alpha / r", gt=0)
    lora_dropout: float = option(0.0, "Dropout on the adapters' input (DPO: needs --keep-dropout)", ge=0, le=0.9)
    lora_target_modules: str = option("all-linear", "Modules that get adapters: all-linear (every linear layer but "
                                      "the output head) or comma-separated names, e.g. q_proj,v_proj")
    merge: bool = option(False, "With LoRA: write the merged full weights to --out, the adapter to --out/adapter "
                         "(without: --out holds the adapter, in PEFT's format)")
    fsdp: bool = option(False, "Shard weights, gradients and optimizer state over the processes (PyTorch FSDP2, one "
                        "unit per decoder layer; CPU and GPU); checkpoints and the final model are saved whole")
    gradient_checkpointing: bool = option(False, "Recompute each layer's activations in the backward pass: "
                                          "activation memory of one layer instead of all, for about a third more "
                                          "compute")
    keep_dropout: bool = option(False, "Keep the model's dropout on in DPO (off by default, as TRL's "
                                "disable_dropout: with dropout the policy's log-probs are noisy and the reference's "
                                "are not, which biases the implicit rewards)")
    dtype: str = option("fp32", "fp32; bf16 autocast (weights and optimizer state stay fp32); or bf16-weights "
                        "(weights, gradients and optimizer state in bf16: half the memory, less precise updates)",
                        choices=("fp32", "float32", "bf16", "bfloat16", "bf16-weights"))
    seed: int = option(0, "Seed for data order, initialisation of the run and dropout", ge=0)
    eval_data: str = option("", "Held-out data, in any --data form (default: a split of --data, see --eval-fraction)")
    eval_split: str = option("test", "Split of --eval-data when it is a data set (directory or hub)")
    eval_fraction: float = option(0.0, "Fraction of --data held out for evaluation when --eval-data is unset",
                              ge=0, le=0.99)
    eval_every: int = option(0, "Evaluate every N steps (0 = only at the end)", ge=0)
    eval_on_start: bool = option(False, "Also evaluate once before the first step, logged as step 0 (not on resume)")
    save_every: int = option(0, "Checkpoint every N steps (0 = only the final model)", ge=0)
    keep_last: int = option(2, "Checkpoints to keep (the newest)", ge=1)
    resume: bool = option(False, "Continue from the newest verified checkpoint in --out (same settings required)")
    overwrite: bool = option(False, "Start over in an --out that holds an earlier run (deletes its checkpoints)")
    log_every: int = option(1, "Write metrics every N steps", ge=1)
    skip_bad: bool = option(False, "Skip malformed rows (counted and reported) instead of stopping")
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint (off: safer)")
    quiet: bool = option(False, "No progress bar")

    def __post_init__(self):
        check_options(self)


@dataclass
class TrainResult:
    out: Path
    steps: int
    metrics: list[dict[str, Any]]
    model: Any = None


# -------------------------------------------------------------------------- data order


def example_tokens(ex) -> int:
    """Tokens of one example as training lays it out (prompt once, then its completion or both completions):
    the length batches are sorted by."""
    if hasattr(ex, "chosen_ids"):
        return len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids)
    return len(ex.prompt_ids) + len(ex.completion_ids)


def epoch_steps(lengths: list[int], global_batch: int, parts: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: indices shuffled, sorted by length within windows of 16 batches (so a
    micro-batch pads little), chunked, and the batches shuffled. A last batch with fewer than `parts`
    examples (one per micro-batch) is dropped."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = global_batch * 16
    order: list[int] = []
    for i in range(0, len(perm), window):
        order += sorted(perm[i : i + window], key=lambda j: lengths[j])
    steps = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    steps = [s for s in steps if len(s) >= parts]
    return [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]


def micro_batches(step: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Split a global batch into `parts` contiguous length-sorted micro-batches of near-equal size."""
    step = sorted(step, key=lambda j: lengths[j])
    n, out, i = len(step), [], 0
    for k in range(parts):
        size = n // parts + (1 if k < n % parts else 0)
        out.append(step[i : i + size])
        i += size
    return out


# -------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_reference(ref, examples, pad_id: int, share_prefix: bool, batch_size: int, progress: bool = False,
                    what: str = "reference log-probs") -> list[torch.Tensor]:
    """Per-token reference log-probs of every completion: [chosen_0, rejected_0, chosen_1, ...]."""
    ref.eval()
    out: list[torch.Tensor] = []
    with progress_bar(progress, transient=True) as bar:
        task = bar.add_task(what, total=len(examples), info="")
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            b = examples_batch(chunk, pad_id, share_prefix)
            lp = completion_logps(ref, b.to(ref.device)).cpu()
            B = len(chunk)
            for j in range(B):
                out += [lp[j, : b.lengths[j]], lp[B + j, : b.lengths[B + j]]]
            bar.update(task, advance=B)
    return out


def pair_stats(pol: torch.Tensor, ref: torch.Tensor | None, mask: torch.Tensor, beta: float, loss_type: str,
               label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and detached per-pair metrics by name, each (B,); `r2q train` logs their means."""
    B = pol.shape[0] // 2
    r = implicit_rewards(pol, ref, mask, beta)
    R = sequence_rewards(r, mask)
    losses = dpo_loss(R[:B], R[B:], beta, loss_type, label_smoothing)
    with torch.no_grad():
        n = mask.sum(-1).float()
        lp = sequence_rewards(pol, mask)
        log_ratio = R / beta  # log pi(y|x) - log pi_ref(y|x) per sequence
        ratio = torch.exp(log_ratio.clamp(max=50.0))
        stats = {
            "loss": losses.detach(), "rewards/chosen": R[:B], "rewards/rejected": R[B:],
            "rewards/margin": R[:B] - R[B:], "rewards/accuracy": (R[:B] > R[B:]).float(),
            "rewards/chosen_token_mean": R[:B] / n[:B], "rewards/rejected_token_mean": R[B:] / n[B:],
            "logps/chosen": lp[:B], "logps/rejected": lp[B:],
            "logps/chosen_token_mean": lp[:B] / n[:B], "logps/rejected_token_mean": lp[B:] / n[B:],
            # estimates on the data, exact in expectation when the completions are samples of pi_ref:
            # KL(pi_ref||pi) = E_ref[-log ratio], KL(pi||pi_ref) = E_ref[ratio * log ratio]
            "kl/ref_pi_est": -(log_ratio[:B] + log_ratio[B:]) / 2,
            "kl/pi_ref_est": (ratio[:B] * log_ratio[:B] + ratio[B:] * log_ratio[B:]) / 2,
        }
    return losses, stats


# -------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, mode: Literal["dpo", "sft"], model=None, tokenizer=None, ref_model=None,
                 train_examples=None, eval_examples=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.mode = cfg, mode
        _validate(cfg, mode)
        self.weights_dtype = "bf16" if cfg.dtype == "bf16-weights" else "fp32"
        self.out = check_out_dir(cfg.out)
        _check_not_in_place(self.out, cfg, mode, model is None, ref_model is None)
        trackers = "tensorboard" if _has_tensorboard() else None
        self.acc = Accelerator(
            gradient_accumulation_steps=1, mixed_precision="bf16" if cfg.dtype in ("bf16", "bfloat16") else "no",
            log_with=trackers, project_dir=str(self.out),
        )
        if int(os.environ.get("WORLD_SIZE", "1")) > self.acc.num_processes:
            # e.g. torchrun on a machine without GPUs: accelerate ignores WORLD_SIZE, so every process would train
            # alone on its own full batch and all of them would write --out
            raise UserError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate sees "
                            f"{self.acc.num_processes}; on CPU set ACCELERATE_USE_CPU=1 (see docs/distributed.md)")
        set_seed(cfg.seed)
        # one run per directory: the lock is taken before anything in --out is read or removed, and held to the end
        self.lock = RunLock(self.out).acquire() if self.acc.is_main_process else None
        try:
            self._setup(model, tokenizer, ref_model, train_examples, eval_examples)
        except BaseException:
            self._unlock(undo=True)
            raise

    def _setup(self, model, tokenizer, ref_model, train_examples, eval_examples) -> None:
        cfg, mode = self.cfg, self.mode
        _check_earlier_run(self.out, cfg)
        if mode == "dpo" and cfg.precompute_ref:  # before any compute: the cache must be writable
            check_out_dir(cfg.cache_dir or refcache.default_cache_dir(), "--cache-dir")
        if model is not None and tokenizer is None:
            raise UserError("an in-memory model needs its tokenizer")
        if model is None:
            check_model_path(cfg.model)
        if mode == "dpo" and cfg.ref not in ("init", "none") and ref_model is None:
            check_model_path(cfg.ref, "reference")
        tokenizer = tokenizer or load_tokenizer(cfg.model, cfg.trust_remote_code)
        self.tokenizer = tokenizer
        self.pad_id = pad_id(tokenizer)
        # data before weights: a bad file fails in a second, not after a model load
        self.train_ex, self.eval_ex, self.report = self._data(train_examples, eval_examples)
        self.inputs = {"model": model_fingerprint(cfg.model) if model is None else refcache.weights_hash(model),
                       "tokenizer": refcache.tokenizer_hash(tokenizer), "data": self._data_hash}
        if model is None:
            model = load_model(cfg.model, self.weights_dtype, cfg.trust_remote_code)
        if cfg.dtype == "bf16-weights":
            model = model.to(torch.bfloat16)
        check_vocab(tokenizer, model)

        # the reference is fixed before any checkpoint is loaded: `init` means the starting weights
        self.ref = None
        self.ref_logps: dict[str, list[torch.Tensor]] = {}
        self.ref_cache_hits = 0
        self.ref_is_base = bool(cfg.lora_r) and mode == "dpo" and cfg.ref == "init" and ref_model is None
        # what the run trains against, by content: --resume refuses a reference whose weights changed
        self.inputs["reference"] = None if mode == "sft" or cfg.ref == "none" else \
            refcache.weights_hash(ref_model) if ref_model is not None else \
            self.inputs["model"] if cfg.ref == "init" else model_fingerprint(cfg.ref)
        if self.ref_is_base:  # the reference is the model with its adapters off: no copy
            if cfg.precompute_ref:
                self._precompute(model)  # the base weights, before any adapter exists
        elif mode == "dpo" and cfg.ref != "none":
            if cfg.ref == "init":
                ref_model = ref_model or copy.deepcopy(model)
            elif ref_model is None:
                ref_model = load_reference(cfg.ref, tokenizer, model, self.weights_dtype, cfg.trust_remote_code)
            check_vocab(tokenizer, model, ref_model)
            ref_model.requires_grad_(False).eval()
            if cfg.precompute_ref:
                self._precompute(ref_model)
            else:
                self.ref = ref_model.to(self.acc.device)

        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        self.share_prefix = shared_layout(cfg.share_prefix, model, self.ref, say=self._note)
        if cfg.lora_r:
            model = with_lora(model, cfg)
        if mode == "dpo" and not cfg.keep_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
            with quiet_deprecations():  # transformers renames it activation checkpointing; both run the same code
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.fsdp and self.acc.distributed_type.value == "FSDP":
            raise UserError("--fsdp and an accelerate FSDP config both shard the model; use one of them")
        self.sharded = cfg.fsdp and self.acc.num_processes > 1
        if cfg.fsdp and not self.sharded:
            self._note("--fsdp: one process, so there is nothing to shard over; training unsharded (launch several "
                       "processes with accelerate launch or torchrun to shard)")
        if self.sharded:
            units = shard(model)
            self._note(f"--fsdp: weights, gradients and optimizer state sharded over {self.acc.num_processes} "
                       f"processes ({units} units)")
        # DDP/FSDP wrap the scorer, so head-only scoring runs inside the wrapped forward
        self.model = TokenScorer(model).train()
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, **_fast_adamw(),
        )
        self.parts = self.acc.num_processes * cfg.grad_accum
        self.global_batch = cfg.batch_size * self.parts
        self.lengths = [example_tokens(e) for e in self.train_ex]
        per_epoch = len(epoch_steps(self.lengths, self.global_batch, self.parts, cfg.seed, 0))
        if per_epoch == 0:
            held = "; lower --batch-size/--grad-accum"
            if cfg.eval_fraction and not cfg.eval_data:
                held = (f" after --eval-fraction {cfg.eval_fraction:g} held out {len(self.eval_ex)}; lower "
                        "--eval-fraction")
            raise UserError(f"{len(self.train_ex)} training examples are fewer than one per micro-batch "
                            f"({self.parts}){held} or add data")
        self.steps_per_epoch = per_epoch
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        from transformers import get_scheduler

        sched = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
        self.sched = get_scheduler(sched, self.opt, num_warmup_steps=cfg.warmup_steps,
                                   num_training_steps=self.total_steps)
        if self.sharded:  # FSDP2 synchronises gradients itself: the model is not wrapped again (no DDP)
            self.opt = self.acc.prepare(self.opt)
        else:
            self.model, self.opt = self.acc.prepare(self.model, self.opt)
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- setup helpers

    def _data(self, train_examples, eval_examples):
        cfg = self.cfg
        load = load_preferences if self.mode == "dpo" else load_sft
        kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, skip_bad=cfg.skip_bad,
                  progress=not cfg.quiet and self.acc.is_main_process)
        report = None
        if train_examples is None:
            train_examples, report = load(cfg.data, self.tokenizer, **kw, split=cfg.split, subset=cfg.subset)
            for line in report.notes():
                self._note(line)
        if eval_examples is None and cfg.eval_data:
            eval_examples, eval_report = load(cfg.eval_data, self.tokenizer, **kw, split=cfg.eval_split,
                                              subset=cfg.subset, split_flag="--eval-split")
            for line in eval_report.notes():
                self._note(line)
        elif eval_examples is None and cfg.eval_fraction > 0:
            g = torch.Generator().manual_seed(cfg.seed)
            perm = torch.randperm(len(train_examples), generator=g).tolist()
            n_eval = max(1, int(round(cfg.eval_fraction * len(train_examples))))
            eval_examples = [train_examples[i] for i in sorted(perm[:n_eval])]
            train_examples = [train_examples[i] for i in sorted(perm[n_eval:])]
        return list(train_examples), list(eval_examples or []), report

    def _precompute(self, ref_model) -> None:
        """Score every completion with the reference once (cached on disk), then drop the model."""
        wh = refcache.weights_hash(ref_model)
        for split, examples in (("train", self.train_ex), ("eval", self.eval_ex)):
            if not examples:
                continue
            path = refcache.cache_path(self.cfg.cache_dir, wh, self.tokenizer, examples)
            cached = refcache.try_load(path, 2 * len(examples), self._note)
            self.acc.wait_for_everyone()  # every rank looks before rank 0 writes, so all take the same branch
            if cached is not None:
                self.ref_logps[split] = cached
                self.ref_cache_hits += 1
                continue
            if self.acc.is_main_process:
                ref_model.to(self.acc.device)
                logps = score_reference(ref_model, examples, self.pad_id,
                                        shared_layout(self.cfg.share_prefix, ref_model),
                                        max(self.cfg.batch_size, 8), progress=not self.cfg.quiet,
                                        what=f"reference log-probs ({split})")
                refcache.save(path, logps)
            self.acc.wait_for_everyone()
            self.ref_logps[split] = refcache.load(path)
        ref_model.to("cpu")

    # ---------------------------------------------------------------- the loop

    def _forward(self, examples, idx: list[int], split: str):
        """Loss terms of one micro-batch: (sum of per-example losses, per-example stats, tokens, count)."""
        if self.mode == "sft":
            b = examples_batch(examples, self.pad_id).to(self.acc.device)
            mask = b.completion_mask()
            nll = sft_loss(self._logps(b), mask, reduction="sum")  # divided by the global token count
            n_tok = mask.sum()
            return nll, {"nll": nll.detach()[None], "tokens": n_tok.float()[None]}, b.num_tokens, n_tok
        b = examples_batch(examples, self.pad_id, self.share_prefix, self.cfg.pack if self.share_prefix else 0)
        b = b.to(self.acc.device)
        pol = self._logps(b)
        mask = b.completion_mask()
        if self.cfg.ref == "none":
            ref = None
        elif self.ref is not None:
            with torch.no_grad():
                ref = completion_logps(self.ref, b)
        elif self.ref_is_base and split not in self.ref_logps:
            lm = self.lm()
            with torch.no_grad(), lm.disable_adapter():
                ref = completion_logps(lm, b)
        else:
            cached = self.ref_logps[split]
            rows = [cached[2 * i] for i in idx] + [cached[2 * i + 1] for i in idx]
            ref = pad_rows(rows, pol.shape[1]).to(pol.device)
        losses, stats = pair_stats(pol, ref, mask, self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing)
        return losses.sum(), stats, b.num_tokens, torch.tensor(len(examples))

    def lm(self):
        """The HF model being trained, out of any wrapper."""
        return self.acc.unwrap_model(self.model).model

    def _logps(self, b: TokenBatch) -> torch.Tensor:
        return b.scatter(self.model(b.input_ids, b.attention_mask, b.position_ids, b.src_index, b.targets))

    def _reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over every example of the step across all processes (sums reduced, then divided). SFT: the
        loss is the NLL per completion token of the whole step."""
        names = list(stats)
        rows = next(iter(stats.values())).shape[0]
        sums = torch.stack([stats[k].sum() for k in names] + [torch.tensor(float(rows), device=self.acc.device)])
        totals = dict(zip(names + ["_rows"], self.acc.reduce(sums, "sum").tolist()))
        if self.mode == "sft":
            loss = totals["nll"] / max(totals["tokens"], 1.0)
            return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        return {k: totals[k] / max(totals["_rows"], 1.0) for k in names}

    def _micro(self, step_idx: list[int]) -> list[list[int]]:
        mine = micro_batches(step_idx, self.lengths, self.parts)
        r = self.acc.process_index
        return mine[r * self.cfg.grad_accum : (r + 1) * self.cfg.grad_accum]

    def _global_count(self, step_idx: list[int]) -> float:
        if self.mode == "sft":
            return float(sum(len(self.train_ex[i].completion_ids) for i in step_idx))
        return float(len(step_idx))

    def train_step(self, step_idx: list[int]) -> dict[str, float]:
        t0 = time.perf_counter()
        denom = self._global_count(step_idx) / self.acc.num_processes
        micro = self._micro(step_idx)
        all_stats, tokens = [], 0
        for k, idx in enumerate(micro):
            sync = k == len(micro) - 1
            ctx = nullcontext() if sync else self.acc.no_sync(self.model)
            with ctx, self.acc.autocast():
                loss_sum, stats, n_tok, _ = self._forward([self.train_ex[i] for i in idx], idx, "train")
                # a non-finite loss is caught below, across processes, before the optimizer steps
                self.acc.backward(loss_sum / denom)
            all_stats.append(stats)
            tokens += n_tok
        stats = {k: torch.cat([st[k] for st in all_stats]) for k in all_stats[0]}
        first = stats["nll" if self.mode == "sft" else "loss"]
        bad = self.acc.reduce(torch.tensor([float(not torch.isfinite(first).all())], device=self.acc.device), "sum")
        if bad.item() > 0:
            self.opt.zero_grad(set_to_none=True)
            last = list_checkpoints(self.out)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
            raise UserError(f"non-finite loss at step {self.step + 1}; training stopped, {where}")
        gnorm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        m = self._reduce(stats)
        dt = time.perf_counter() - t0
        tok = self.acc.reduce(torch.tensor([float(tokens)], device=self.acc.device), "sum").item()
        m.update(grad_norm=float(gnorm), lr=lr, tokens_per_s=tok / dt, examples_per_s=len(step_idx) / dt,
                 step_time_s=dt)
        return m

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        lengths = [example_tokens(e) for e in self.eval_ex]
        order = sorted(range(len(self.eval_ex)), key=lambda j: lengths[j])
        r, P = self.acc.process_index, self.acc.num_processes
        mine, bs = order[r::P], self.cfg.batch_size
        # every rank runs the same number of forwards: a wrapped model's forward is collective (DDP syncs
        # buffers, FSDP gathers weights), so a rank that stopped early would leave the others waiting
        stats, names = [], []
        for i in range(0, math.ceil(len(order) / P), bs):
            idx = mine[i : i + bs]
            with self.acc.autocast():
                s = self._forward([self.eval_ex[j] for j in idx or order[:1]], idx or order[:1], "eval")[1]
            names = list(s)
            if idx:  # an idle rank scores a stand-in row and drops it
                stats.append(s)
        self.model.train()
        empty = torch.zeros(0, device=self.acc.device)
        return self._reduce({k: torch.cat([st[k] for st in stats]) if stats else empty for k in names})

    def _log(self, m: dict[str, Any]) -> None:
        self.metrics.append(m)
        if self.acc.is_main_process:
            append_line(self.out / "metrics.jsonl", json.dumps(m))
        if self.acc.log_with:
            self.acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"])

    def _full_state(self, optimizer: bool = True) -> tuple[dict | None, dict | None]:
        """FSDP: the whole model (and optimizer) state, gathered by every process, on process 0's CPU."""
        if not self.sharded:
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        lm = self.lm()
        model_sd = get_model_state_dict(lm, options=opts)
        optim_sd = get_optimizer_state_dict(lm, getattr(self.opt, "optimizer", self.opt),  # accelerate wraps it
                                            options=opts) if optimizer else None
        return model_sd, optim_sd

    def _save(self) -> None:
        unwrapped = self.lm()
        model_sd, optim_sd = self._full_state()
        save_checkpoint(self.out, self.step, unwrapped, self.tokenizer, self.opt, self.sched,
                        {"config": self._recorded(), "mode": self.mode, "total_steps": self.total_steps,
                         "data_hash": self._data_hash, "inputs": self.inputs},
                        self.cfg.keep_last, self.acc.is_main_process, self.acc.process_index,
                        self.acc.wait_for_everyone, model_sd, optim_sd)

    def _recorded(self) -> dict[str, Any]:
        """The config as r2q_config.json and checkpoints record it: local paths made absolute, so that `credit`
        and `--resume` find the same files from any directory."""
        d = dict(asdict(self.cfg), mode=self.mode)
        for k in ("model", "data", "ref", "eval_data", "cache_dir", "out"):  # (a hub id is not a path: kept)
            if d[k] and Path(d[k]).exists():
                d[k] = str(Path(d[k]).resolve())
        return d

    @functools.cached_property
    def _data_hash(self) -> str:
        """The training tokens' hash, recorded in every checkpoint (computed once: it reads every token)."""
        return refcache.data_hash(refcache.completion_sequences(self.train_ex))

    def _note(self, msg: str) -> None:
        if self.acc.is_main_process:  # one line per run, not one per process
            note(msg)

    def _resume(self) -> None:
        """Load the newest checkpoint that verifies and was written by this same run (settings and data);
        damaged ones are skipped with a line each. No checkpoint at all: start at step 0, said so."""
        found = list_checkpoints(self.out)
        if not found:
            # metrics logged before the first checkpoint belong to a run that starts over: drop them
            _truncate_metrics(self.out / "metrics.jsonl", 0, self.acc.is_main_process, self._note)
            self._note(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting at step 0")
            return
        for ck in reversed(found):
            why, kind = verify(ck), "damaged checkpoint"
            if why is None:
                self._check_same_run(ck, json.loads((ck / STATE).read_text()))
                try:
                    state = load_checkpoint(ck, self.lm(), self.opt, self.sched, self.acc.process_index)
                except ValueError as e:  # load_weights' strict fit: intact, but written for another model
                    why, kind = f"it does not fit the model being trained ({' '.join(str(e).split())[:200]})", \
                        "checkpoint"
                except (KeyError, OSError, RuntimeError, SafetensorError) as e:
                    why = f"cannot be loaded ({' '.join(str(e).split())[:200]})"
            if why is not None:
                self._note(f"skipping {kind} {ck}: {why}")
                continue
            self.step = state["step"]
            self._note(f"resuming from {ck} (step {self.step} of {self.total_steps})")
            _truncate_metrics(self.out / "metrics.jsonl", self.step, self.acc.is_main_process, self._note)
            return
        raise UserError(f"--resume: none of the {len(found)} checkpoints in {self.out / 'checkpoints'} is usable "
                        "(see above); start over with --overwrite")

    def _check_same_run(self, ck: Path, state: dict[str, Any]) -> None:
        saved, now = state.get("config", {}), self._recorded()
        changed = [k for k in now if k not in FREE_ON_RESUME and saved.get(k) != now[k]]
        longer = [k for k in changed if k in ("max_steps", "epochs")]
        if longer:  # training on (or stopping sooner) is allowed; a decaying schedule now ends at the new total
            self._note("--resume: " + ", ".join(f"{flag(k)} {saved.get(k)!r} -> {now[k]!r}" for k in longer)
                       + f"; the run now ends at step {self.total_steps}")
        diff = [f"{flag(k)} {saved.get(k)!r} -> {now[k]!r}" for k in changed if k not in longer]
        diff += self._changed_inputs(state)
        if diff:
            raise UserError(f"--resume: {ck} was written by a run with other settings: {'; '.join(diff)}. Resume "
                            "with the same settings and inputs, or start over with --overwrite")

    def _changed_inputs(self, state: dict[str, Any]) -> list[str]:
        """The inputs whose content differs from what checkpoint `state` recorded (by fingerprint)."""
        cfg, saved = self.cfg, dict(state.get("inputs") or {})
        saved.setdefault("data", state.get("data_hash"))  # checkpoints of r2q before the inputs table
        start = f"the starting model --model {cfg.model}"
        what = {"data": "the training data (its tokens differ)",
                "tokenizer": "the tokenizer (its vocabulary differs)",
                "reference": f"{start}, the reference of --ref init (its weights changed)" if cfg.ref == "init"
                else f"the reference --ref {cfg.ref} (its weights changed)",
                "model": f"{start}, the base of the LoRA adapters (its weights changed)"}
        keys = ["data", "tokenizer", "reference"] + (["model"] if cfg.lora_r and cfg.ref != "init" else [])
        return [what[k] for k in keys if saved.get(k) and self.inputs.get(k) and saved[k] != self.inputs[k]]

    def _unlock(self, undo: bool = False) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release(undo)
            self.lock = None

    def _start(self) -> None:
        """Before the first step: leftovers of a killed run removed; --resume loads a checkpoint, a fresh or
        --overwrite run removes every file of the earlier run, final weights and record included, before it writes
        anything, so the directory never pairs old weights with a new record."""
        if self.acc.is_main_process:  # the lock is ours: any temp dir here was left by a killed run
            for tmp in [*self.out.glob(".tmp-save-*"), *(self.out / "checkpoints").glob(".tmp-step-*")]:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.cfg.resume:
            self._resume()
        elif self.acc.is_main_process:
            _clear_run(self.out)
        self.acc.wait_for_everyone()

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self._unlock()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._start()
        if self.acc.log_with:
            self.acc.init_trackers("r2q", config={k: v for k, v in asdict(cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})
        progress = progress_bar(not cfg.quiet and self.acc.is_main_process)
        with progress:
            task = progress.add_task("sft" if self.mode == "sft" else "dpo", total=self.total_steps,
                                     completed=self.step, info="")
            if self.eval_ex and cfg.eval_on_start and self.step == 0:  # not on resume: the run has started
                self._log({"step": 0, "split": "eval", **self.evaluate()})
            order: tuple[int, list[list[int]]] = (-1, [])
            while self.step < self.total_steps:
                epoch, pos = divmod(self.step, self.steps_per_epoch)
                if order[0] != epoch:  # the epoch's batches, computed once per epoch
                    order = (epoch, epoch_steps(self.lengths, self.global_batch, self.parts, cfg.seed, epoch))
                step_idx = order[1][pos]
                m = self.train_step(step_idx)
                self.step += 1
                m = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "train", **m}
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(m)
                progress.update(task, completed=self.step, info=_brief(m))
                if self.eval_ex and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._log({"step": self.step, "split": "eval", **self.evaluate()})
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save()
        if self.eval_ex and not (cfg.eval_every and self.step % cfg.eval_every == 0):
            self._log({"step": self.step, "split": "eval", **self.evaluate()})
        final = self._save_final()
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return TrainResult(self.out, self.step, self.metrics, final)

    def _save_final(self):
        """The final model (or adapter) and tokenizer, each file renamed into --out over whatever path (or planted
        link) was there; then, last, the run record that describes them."""
        cfg, final = self.cfg, self.lm()
        model_sd, _ = self._full_state(optimizer=False)
        if not self.acc.is_main_process:
            return final
        if cfg.lora_r:
            final.peft_config["default"].base_model_name_or_path = self._recorded()["model"]
        if cfg.lora_r and cfg.merge:
            save_into(self.out / "adapter", lambda d: final.save_pretrained(d, safe_serialization=True))
            final = final.merge_and_unload()
        kw = {"state_dict": model_sd} if model_sd else {}

        def save(d: Path) -> None:
            final.save_pretrained(d, safe_serialization=True, **kw)
            self.tokenizer.save_pretrained(d)

        save_into(self.out, save)
        write_record(self.out, self._recorded(), self.inputs)
        return final


# options that may differ between a run and its resumption: they change neither the updates nor the data
FREE_ON_RESUME = {"resume", "overwrite", "quiet", "eval_every", "eval_on_start", "save_every", "keep_last",
                  "log_every", "cache_dir", "precompute_ref", "trust_remote_code", "eval_data", "eval_split", "out"}


def _truncate_metrics(path: Path, step: int, is_main: bool, note=note) -> None:
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


def _earlier_run(out: Path) -> list[str]:
    """What of an earlier run `out` holds: checkpoints, metrics, final weights or a run record."""
    found = (["checkpoints"] if list_checkpoints(out) else []) + \
        (["metrics.jsonl"] if (out / "metrics.jsonl").exists() else [])
    weights = [p.name for p in out.glob("*.safetensors")] if out.is_dir() else []
    return found + weights[:2] + ([RECORD] if (out / RECORD).exists() else [])


def _check_earlier_run(out: Path, cfg: TrainConfig) -> None:
    """A fresh run must not mix with (or silently delete) an earlier run's checkpoints, metrics or weights."""
    if cfg.resume or cfg.overwrite or not out.is_dir():
        return
    found = _earlier_run(out)
    if found:
        raise UserError(f"--out {out} holds an earlier run ({', '.join(found)}); continue it with --resume, "
                        "start over with --overwrite, or choose another --out")


def _clear_run(out: Path) -> None:
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


def _check_not_in_place(out: Path, cfg: TrainConfig, mode: str, model_from_path: bool, ref_from_path: bool) -> None:
    """Training into the directory the weights come from would overwrite them (and make the model its own
    reference): --out must differ from --model and --ref, symlinks resolved."""
    if model_from_path and cfg.model and _same(out, cfg.model):
        raise UserError(f"--out {out} is the --model directory; training there would overwrite the starting weights "
                        "(and the trained model would be its own reference): choose another --out")
    if mode == "dpo" and ref_from_path and cfg.ref not in ("init", "none", "") and _same(out, cfg.ref):
        raise UserError(f"--out {out} is the --ref directory; training there would overwrite the reference: choose "
                        "another --out")


DPO_ONLY = ("ref", "beta", "loss", "label_smoothing", "precompute_ref", "keep_dropout", "pack")


def _validate(cfg: TrainConfig, mode: str) -> None:
    """What the ranges of single options cannot say (those are checked when the config is made)."""
    if not cfg.out:
        raise UserError("--out is required")
    if cfg.label_smoothing and cfg.loss != "cdpo":
        raise UserError(f"--label-smoothing is for --loss cdpo (got --loss {cfg.loss})")
    check_prompt_fits(cfg.max_length, cfg.max_prompt_length)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one")
    if cfg.fsdp and cfg.lora_r:
        raise UserError("--fsdp with --lora-r is not supported yet; LoRA trains few enough weights for DDP")
    if cfg.pack and not cfg.share_prefix:
        raise UserError("--pack packs prefix-shared pairs; it cannot be used with --no-share-prefix")
    lora_set = _given(cfg, ("lora_alpha", "lora_dropout", "lora_target_modules", "merge"))
    if lora_set and not cfg.lora_r:
        raise UserError(f"{flag(lora_set[0])} is a LoRA option; give --lora-r too")
    if cfg.lora_dropout and mode == "dpo" and not cfg.keep_dropout:
        raise UserError("--lora-dropout would be turned off with the rest of the dropout in DPO; add --keep-dropout")
    if mode == "sft" and (dpo_set := _given(cfg, DPO_ONLY)):
        raise UserError(f"{flag(dpo_set[0])} is a DPO option (r2q train); r2q sft does not use it")


def _given(cfg: TrainConfig, names) -> list[str]:
    """The options among `names` set to something other than their default."""
    return [n for n in names if getattr(cfg, n) != getattr(TrainConfig, n)]


def shard(model) -> int:
    """FSDP2 over the default process group: one unit per decoder layer (the classes the model names in
    _no_split_modules), then the rest of the model."""
    from torch.distributed.fsdp import fully_shard

    units = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in units]
    if not layers:
        raise UserError(f"--fsdp: {type(model).__name__} does not name its decoder layers (_no_split_modules)")
    for m in layers:
        fully_shard(m)
    fully_shard(model)
    return len(layers) + 1


def with_lora(model, cfg: TrainConfig):
    """The model with LoRA adapters (PEFT) on cfg.lora_target_modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    target: str | list[str] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    try:
        with quiet_deprecations():
            return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                    lora_dropout=cfg.lora_dropout, target_modules=target,
                                                    task_type="CAUSAL_LM"))
    except ValueError as e:  # e.g. a target module the model does not have
        raise UserError(f"--lora-target-modules {targets}: {first_line(e)}") from e


def _fast_adamw() -> dict[str, bool]:
    """The fused AdamW kernel (one call for all tensors) where this torch has it; the loop over tensors is
    several times slower on CPU."""
    return {"fused": True} if "fused" in inspect.signature(torch.optim.AdamW).parameters else {}


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _brief(m: dict[str, Any]) -> str:
    keys = ("loss", "rewards/margin", "rewards/accuracy") if "rewards/margin" in m else ("loss", "ppl")
    return "  ".join(f"{k.split('/')[-1]} {m[k]:.4g}" for k in keys)


def train(cfg: TrainConfig, mode: Literal["dpo", "sft"] = "dpo", **kw) -> TrainResult:
    """Run DPO (mode='dpo') or SFT (mode='sft'). kw: model, tokenizer, ref_model, train/eval_examples."""
    return Trainer(cfg, mode, **kw).run()
