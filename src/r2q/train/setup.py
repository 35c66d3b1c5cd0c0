"""Setting a run up, one function per part: the accelerator, the input checks, the data, the starting policy, the
reference of each split and the step plan. The trainer's constructor is a list of these calls."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import refcache
from ..data import check_fit, load_preferences, load_sft
from ..errors import UserError, first_line
from ..models import check_model_path, check_vocab, load_model, load_reference, pad_id, position_limit
from ..paths import check_out_dir
from ..prepare import shard
from ..record import model_fingerprint
from ..reference import AdaptersOff, LiveReference, NoReference, Reference, precomputed
from ..tokens import attn_impl, shared_layout
from .config import TrainConfig, trackers
from .order import epoch_steps, example_tokens


def accelerator(cfg: TrainConfig, out: Path):
    """accelerate's Accelerator for this run (bf16 autocast for --dtype bf16; TensorBoard when installed), refusing a
    launch whose processes accelerate does not see."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(gradient_accumulation_steps=1, project_dir=str(out),
                      mixed_precision="bf16" if cfg.dtype in ("bf16", "bfloat16") else "no",
                      log_with=trackers(cfg.report_to) or None)
    if int(os.environ.get("WORLD_SIZE", "1")) > acc.num_processes:
        # e.g. torchrun on a machine without GPUs: accelerate ignores WORLD_SIZE, so every process would train
        # alone on its own full batch and all of them would write --out
        raise UserError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate sees "
                        f"{acc.num_processes}; on CPU set ACCELERATE_USE_CPU=1 (see docs/distributed.md)")
    set_seed(cfg.seed)
    return acc


def start_trackers(acc, cfg: TrainConfig, mode: str, out: Path) -> None:
    """Open the run in each tracker, with the settings as its config and --run-name (default: --out's name)."""
    if not acc.log_with:
        return
    name = cfg.run_name or out.name
    config = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
    try:
        acc.init_trackers("r2q", config=dict(config, mode=mode),
                          init_kwargs={"wandb": {"name": name, "dir": str(out)}, "mlflow": {"run_name": name}})
    except Exception as e:  # a tracker's own setup (a store it cannot open, a login it lacks): its message, one line
        raise UserError(f"--report-to {cfg.report_to}: the tracker could not start: {first_line(e)}") from e


def tracker_metrics(m: dict) -> dict[str, float]:
    """A metrics line as trackers get it: the numbers only, eval ones prefixed eval_ (as transformers' Trainer)."""
    pre = "eval_" if m.get("split") == "eval" else ""
    return {pre + k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_inputs(cfg: TrainConfig, mode: str, model, tokenizer, ref_model) -> None:
    """Every input path, and the cache's writability, before anything is loaded or computed."""
    if mode == "dpo" and cfg.precompute_ref:
        check_out_dir(cfg.cache_dir or refcache.default_cache_dir(), "--cache-dir")
    if model is not None and tokenizer is None:
        raise UserError("an in-memory model needs its tokenizer")
    if ref_model is not None and ref_model is model:
        raise UserError("ref_model is the policy itself: training would move the reference with it (and freezing "
                        "the reference would freeze the policy). Pass a copy (copy.deepcopy), or no ref_model and "
                        "ref='init' for a frozen copy of the starting weights")
    if model is None:
        check_model_path(cfg.model)
    if mode == "dpo" and cfg.ref not in ("init", "none") and ref_model is None:
        check_model_path(cfg.ref, "reference")


def load_data(cfg: TrainConfig, mode: str, tokenizer, train_examples, eval_examples, progress: bool,
              say: Callable[[str], None]):
    """(train examples, eval examples, the training data's report): read and tokenised unless given; eval from
    --eval-data, or --eval-fraction of the training data held out by a seeded draw."""
    load = load_preferences if mode == "dpo" else load_sft
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, skip_bad=cfg.skip_bad,
              progress=progress)
    report = None
    if train_examples is None:
        train_examples, report = load(cfg.data, tokenizer, **kw, split=cfg.split, subset=cfg.subset)
        for line in report.notes():
            say(line)
    if eval_examples is None and cfg.eval_data:
        eval_examples, eval_report = load(cfg.eval_data, tokenizer, **kw, split=cfg.eval_split, subset=cfg.subset,
                                          split_flag="--eval-split")
        for line in eval_report.notes():
            say(line)
    elif eval_examples is None and cfg.eval_fraction > 0:
        g = torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(len(train_examples), generator=g).tolist()
        n_eval = max(1, int(round(cfg.eval_fraction * len(train_examples))))
        eval_examples = [train_examples[i] for i in sorted(perm[:n_eval])]
        train_examples = [train_examples[i] for i in sorted(perm[n_eval:])]
    return list(train_examples), list(eval_examples or []), report


def weights_dtype(cfg: TrainConfig) -> str:
    return "bf16" if cfg.dtype == "bf16-weights" else "fp32"


def starting_policy(cfg: TrainConfig, model, tokenizer, examples: list, device: torch.device):
    """The starting weights (loaded unless given), in the weights' dtype, checked against the tokenizer, against
    the examples' lengths (a learned position table) and against the device (FlexAttention's backward)."""
    if model is None:
        model = load_model(cfg.model, weights_dtype(cfg), cfg.trust_remote_code, cfg.attn_implementation)
    elif cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.dtype == "bf16-weights":
        model = model.to(torch.bfloat16)
    check_vocab(tokenizer, model)
    check_fit(examples, position_limit(model))
    impl = attn_impl(model)
    if "flex" in impl and device.type == "cpu":
        raise UserError(f"the model runs {impl}, which has no backward on the CPU in torch {torch.__version__}: "
                        "train on a GPU, or choose another kernel (--attn-implementation sdpa; "
                        "attn_implementation='sdpa' in Python). Credit and generate run FlexAttention on the CPU")
    return model


def fingerprints(cfg: TrainConfig, mode: str, model, ref_model, tokenizer, data_hash: str) -> dict[str, str | None]:
    """What the run trains from and against, by content: the starting model's weights, the reference's, the
    tokenizer's vocabulary and the training tokens. Checkpoints and the run record carry them; --resume checks."""
    start = model_fingerprint(cfg.model) if model is None else refcache.weights_hash(model)
    ref = None if mode == "sft" or cfg.ref == "none" else refcache.weights_hash(ref_model) \
        if ref_model is not None else start if cfg.ref == "init" else model_fingerprint(cfg.ref)
    return {"model": start, "tokenizer": refcache.tokenizer_hash(tokenizer), "data": data_hash, "reference": ref}


@dataclass
class Precompute:
    """How --precompute-ref scores the reference once: the data of each split and the distributed plumbing."""

    splits: dict[str, list]
    tokenizer: object
    cache_dir: str
    share_prefix: bool
    batch_size: int
    acc: object
    progress: bool
    say: Callable[[str], None]

    def __call__(self, ref_model) -> tuple[dict[str, Reference], int]:
        """Cached references of every split that has examples, and how many were in the cache already; the model
        is scored on the accelerator's device, then put back on the CPU."""
        out, hits, acc = {}, 0, self.acc
        if acc.is_main_process:
            ref_model.to(acc.device)
        for split, examples in self.splits.items():
            if examples:
                out[split], hit = precomputed(
                    ref_model, self.tokenizer, examples, pad_id(self.tokenizer), self.cache_dir,
                    share_prefix=shared_layout(self.share_prefix, ref_model), batch_size=self.batch_size,
                    progress=self.progress, what=f"reference log-probs ({split})", is_main=acc.is_main_process,
                    barrier=acc.wait_for_everyone, say=self.say)
                hits += hit
        ref_model.to("cpu")
        return out, hits


def reference(cfg: TrainConfig, mode: str, model, ref_model, tokenizer, device, policy: Callable,
              precompute: Precompute) -> tuple[dict[str, Reference], int]:
    """The reference of each split (train, eval) and the number found in the disk cache: none; the policy with its
    adapters off (LoRA with --ref init; `policy` returns the PEFT model as it trains); a live frozen model; or its
    log-probs cached on disk (--precompute-ref)."""
    if mode == "sft" or cfg.ref == "none":
        return dict.fromkeys(("train", "eval"), NoReference()), 0
    if cfg.lora_r and cfg.ref == "init" and ref_model is None:  # the base itself: no copy
        off = AdaptersOff(policy)
        cached, hits = precompute(model) if cfg.precompute_ref else ({}, 0)
        return {"train": off, "eval": off, **cached}, hits
    if cfg.ref == "init":
        ref_model = ref_model or copy.deepcopy(model)
    elif ref_model is None:
        ref_model = load_reference(cfg.ref, tokenizer, model, weights_dtype(cfg), cfg.trust_remote_code,
                                   attn=cfg.attn_implementation)
    check_vocab(tokenizer, model, ref_model)
    check_fit([e for split in precompute.splits.values() for e in split], position_limit(ref_model))
    ref_model.requires_grad_(False).eval()
    if cfg.precompute_ref:
        cached, hits = precompute(ref_model)
        return {"train": NoReference(), "eval": NoReference(), **cached}, hits
    live = LiveReference(ref_model.to(device))
    return {"train": live, "eval": live}, 0


def shard_if_asked(model, cfg: TrainConfig, acc, say: Callable[[str], None]) -> bool:
    """FSDP2 over the processes when --fsdp is given and there are several; said either way."""
    if cfg.fsdp and acc.distributed_type.value == "FSDP":
        raise UserError("--fsdp and an accelerate FSDP config both shard the model; use one of them")
    if cfg.fsdp and acc.num_processes == 1:
        say("--fsdp: one process, so there is nothing to shard over; training unsharded (launch several processes "
            "with accelerate launch or torchrun to shard)")
    if not (cfg.fsdp and acc.num_processes > 1):
        return False
    units = shard(model)
    say(f"--fsdp: weights, gradients and optimizer state sharded over {acc.num_processes} processes ({units} units)")
    return True


@dataclass
class StepPlan:
    """How the run steps: micro-batches per step (`parts`), examples per step, every training example's length
    (what batches are sorted by), steps per epoch and in all."""

    parts: int
    global_batch: int
    lengths: list[int]
    steps_per_epoch: int
    total_steps: int


def plan_steps(cfg: TrainConfig, processes: int, train_ex: list, n_eval: int,
               say: Callable[[str], None] = lambda _: None) -> StepPlan:
    parts = processes * cfg.grad_accum
    global_batch = cfg.batch_size * parts
    lengths = [example_tokens(e) for e in train_ex]
    per_epoch = len(epoch_steps(lengths, global_batch, parts, cfg.seed, 0))
    if per_epoch == 0:
        held = "; lower --batch-size/--grad-accum"
        if cfg.eval_fraction and not cfg.eval_data:
            held = f" after --eval-fraction {cfg.eval_fraction:g} held out {n_eval}; lower --eval-fraction"
        raise UserError(f"{len(train_ex)} training examples are fewer than one per micro-batch ({parts}){held} or "
                        "add data")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    if cfg.warmup_steps > total:  # allowed (as in transformers), and said: the peak rate is never reached
        say(f"--warmup-steps {cfg.warmup_steps} is more than the run's {total} steps: the learning rate stops at "
            f"{total / cfg.warmup_steps:.2g} of --lr")
    return StepPlan(parts, global_batch, lengths, per_epoch, total)
