"""The trainer: token-level DPO (and SFT) for any HF causal LM, resumable, distributed through accelerate.

One optimizer step consumes a global batch of `batch_size * processes * grad_accum` examples, split into
length-sorted micro-batches. Each process's loss is its share of the global mean (sum / global count *
processes, since DDP averages gradients), so any split of the same global batch gives the same update.
The data order is a function of (seed, epoch) only, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from safetensors import SafetensorError

from .. import refcache
from ..checkpoint import StateMismatch, list_checkpoints, load_checkpoint, read_state, save_checkpoint, verify
from ..errors import UserError, note
from ..losses import pair_stats, sft_loss
from ..models import load_tokenizer, pad_id
from ..paths import RunLock, append_line, check_out_dir, save_into
from ..prepare import optimizer, schedule, trainable
from ..progress import progress_bar
from ..record import recorded_config, write_record
from ..reference import batch_slots
from ..tokens import TokenBatch, TokenScorer, examples_batch, shared_layout
from . import setup
from .config import TrainConfig, validate
from .order import epoch_steps, example_tokens, micro_batches
from .rundir import (
    check_earlier_run,
    check_not_in_place,
    check_resumable,
    check_resume_settings,
    clear_run,
    refuse_changes,
    resume_changes,
    truncate_metrics,
)


@dataclass
class TrainResult:
    out: Path
    steps: int
    metrics: list[dict[str, Any]]
    model: Any = None


# -------------------------------------------------------------------------- scoring


# -------------------------------------------------------------------------- trainer


class Trainer:
    """The DPO / SFT loop: steps, evaluation, logging, checkpoints and resume. Setting up is a list of calls to the
    functions that build each part (`prepare`, `reference`, `rundir`)."""

    def __init__(self, cfg: TrainConfig, mode: Literal["dpo", "sft"], model=None, tokenizer=None, ref_model=None,
                 train_examples=None, eval_examples=None):
        self.cfg, self.mode = cfg, mode
        validate(cfg, mode)
        self.out = check_out_dir(cfg.out)
        check_not_in_place(self.out, cfg.model if model is None else "",
                           cfg.ref if mode == "dpo" and ref_model is None and cfg.ref not in ("init", "none") else "")
        self.acc = setup.accelerator(cfg, self.out)
        # one run per directory: the lock is taken before anything in --out is read or removed, and held to the end
        self.lock = RunLock(self.out).acquire() if self.acc.is_main_process else None
        try:
            if not (cfg.resume or cfg.overwrite):
                check_earlier_run(self.out)
            elif cfg.resume:
                check_resumable(self.out)
                check_resume_settings(self.out, self._recorded())
            setup.check_inputs(cfg, mode, model, tokenizer, ref_model)
            self.tokenizer = tokenizer = tokenizer or load_tokenizer(cfg.model, cfg.trust_remote_code)
            self.pad_id = pad_id(tokenizer)
            # data before weights: a bad file fails in a second, not after a model load
            self.train_ex, self.eval_ex, self.report = setup.load_data(
                cfg, mode, tokenizer, train_examples, eval_examples, not cfg.quiet and self.acc.is_main_process,
                self._note)
            self.inputs = setup.fingerprints(cfg, mode, model, ref_model, tokenizer, self._data_hash)
            model = setup.starting_policy(cfg, model, tokenizer, self.train_ex + self.eval_ex, self.acc.device)
            # the reference is fixed before any checkpoint is loaded: `init` means the starting weights
            self.refs, self.ref_cache_hits = setup.reference(cfg, mode, model, ref_model, tokenizer, self.acc.device,
                                                             self.lm, self._precompute())
            self.share_prefix = shared_layout(cfg.share_prefix, model, self.refs["train"].model, say=self._note)
            model = trainable(model, keep_dropout=cfg.keep_dropout or mode == "sft",
                              checkpointing=cfg.gradient_checkpointing, lora=_lora(cfg))
            self.sharded = setup.shard_if_asked(model, cfg, self.acc, self._note)
            self.plan = setup.plan_steps(cfg, self.acc.num_processes, self.train_ex, len(self.eval_ex), self._note)
            self._optimize(model)
        except BaseException:
            self._unlock(undo=True)
            raise
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

    def _precompute(self) -> setup.Precompute:
        cfg = self.cfg
        return setup.Precompute({"train": self.train_ex, "eval": self.eval_ex}, self.tokenizer, cfg.cache_dir,
                                cfg.share_prefix, max(cfg.batch_size, 8), self.acc, not cfg.quiet, self._note)

    def _optimize(self, model) -> None:
        """The scorer that the optimizer trains, AdamW, the schedule, and accelerate's wrapping of them. DDP/FSDP
        wrap the scorer, so head-only scoring runs inside the wrapped forward; FSDP2 synchronises gradients itself,
        so a sharded model is not wrapped again."""
        cfg = self.cfg
        self.model = TokenScorer(model).train()
        self.opt = optimizer(model, cfg.lr, cfg.weight_decay)
        self.sched = schedule(self.opt, cfg.schedule, cfg.warmup_steps, self.total_steps)
        if self.sharded:
            self.opt = self.acc.prepare(self.opt)
        else:
            self.model, self.opt = self.acc.prepare(self.model, self.opt)

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

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
        ref = self.refs[split].logps(b, batch_slots(idx, pairs=True))
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

    def _epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`: a function of (seed, epoch) only, computed once per epoch."""
        if getattr(self, "_order", (None,))[0] != epoch:
            p = self.plan
            self._order = (epoch, epoch_steps(p.lengths, p.global_batch, p.parts, self.cfg.seed, epoch))
        return self._order[1]

    def _micro(self, step_idx: list[int]) -> list[list[int]]:
        mine = micro_batches(step_idx, self.plan.lengths, self.plan.parts)
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
            self._stop(f"non-finite loss at step {self.step + 1}")
        gnorm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm or float("inf"))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
        if not math.isfinite(float(gnorm)):  # the same on every process (the norm of the reduced gradients)
            # clipping would scale every gradient by 0 (inf) or NaN: the step would leave the weights as they were
            self._stop(f"non-finite gradient norm ({float(gnorm)}) at step {self.step + 1}, from a finite loss (a "
                       "gradient overflowed: is --beta or --lr far too large?)")
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        m = self._reduce(stats)
        dt = time.perf_counter() - t0
        tok = self.acc.reduce(torch.tensor([float(tokens)], device=self.acc.device), "sum").item()
        m.update(grad_norm=float(gnorm), learning_rate=lr, tokens_per_s=tok / dt, examples_per_s=len(step_idx) / dt,
                 step_time_s=dt)
        return m

    def _stop(self, what: str) -> NoReturn:
        """End training at a step that cannot be taken: nothing of it is applied, the checkpoints stay."""
        self.opt.zero_grad(set_to_none=True)
        last = list_checkpoints(self.out)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written"
        raise UserError(f"{what}; training stopped, {where}")

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
            self.acc.log(setup.tracker_metrics(m), step=m["step"])

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
        return recorded_config(asdict(self.cfg), self.mode)

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
            truncate_metrics(self.out / "metrics.jsonl", 0, self.acc.is_main_process, self._note)
            self._note(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting at step 0")
            return
        for ck in reversed(found):
            why, kind = verify(ck), "damaged checkpoint"
            if why is None:
                state, why = read_state(ck)
            if why is None:
                longer = self._check_same_run(ck, state)
                try:
                    state = load_checkpoint(ck, self.lm(), self.opt, self.sched, self.acc.process_index)
                except StateMismatch as e:
                    why, kind = str(e), "checkpoint"
                except ValueError as e:  # load_weights' strict fit: intact, but written for another model
                    why, kind = f"it does not fit the model being trained ({' '.join(str(e).split())[:200]})", \
                        "checkpoint"
                except (KeyError, OSError, RuntimeError, SafetensorError) as e:
                    why = f"cannot be loaded ({' '.join(str(e).split())[:200]})"
            if why is not None:
                self._note(f"skipping {kind} {ck}: {why}")
                continue
            self.step = state["step"]
            if longer:  # training on (or stopping sooner) is allowed; a decaying schedule now ends at the new total
                self._note(f"--resume: {', '.join(longer)}; the run now ends at step {self.total_steps}")
            self._note(f"resuming from {ck} (step {self.step} of {self.total_steps})")
            truncate_metrics(self.out / "metrics.jsonl", self.step, self.acc.is_main_process, self._note)
            return
        raise UserError(f"--resume: none of the {len(found)} checkpoints in {self.out / 'checkpoints'} is usable "
                        "(see above); start over with --overwrite")

    def _check_same_run(self, ck: Path, state: dict[str, Any]) -> list[str]:
        """The changes of length between the checkpoint's run and this one (allowed); any other change refused."""
        longer, diff = resume_changes(state, self._recorded(), self.inputs)
        refuse_changes(ck, diff)
        return longer

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
            clear_run(self.out)
        self.acc.wait_for_everyone()

    def run(self) -> TrainResult:
        try:
            result = self._run()
        except BaseException:  # e.g. a non-finite loss at step 1: a directory the run made and left empty goes
            self._unlock(undo=True)
            raise
        self._unlock()
        return result

    def _run(self) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._start()
        setup.start_trackers(self.acc, cfg, self.mode, self.out)
        progress = progress_bar(not cfg.quiet and self.acc.is_main_process)
        with progress:
            task = progress.add_task("sft" if self.mode == "sft" else "dpo", total=self.total_steps,
                                     completed=self.step, info="")
            if self.eval_ex and cfg.eval_on_start and self.step == 0:  # not on resume: the run has started
                self._log({"step": 0, "split": "eval", **self.evaluate()})
            while self.step < self.total_steps:
                epoch, pos = divmod(self.step, self.plan.steps_per_epoch)
                m = self.train_step(self._epoch(epoch)[pos])
                self.step += 1
                m = {"step": self.step, "epoch": self.step / self.plan.steps_per_epoch, "split": "train", **m}
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


def _lora(cfg: TrainConfig) -> tuple[int, float, float, str] | None:
    return (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) if cfg.lora_r else None


def _brief(m: dict[str, Any]) -> str:
    keys = ("loss", "rewards/margins", "rewards/accuracies") if "rewards/margins" in m else ("loss", "ppl")
    return "  ".join(f"{k.split('/')[-1]} {m[k]:.4g}" for k in keys)


def train(cfg: TrainConfig, mode: Literal["dpo", "sft"] = "dpo", **kw) -> TrainResult:
    """Run DPO (mode='dpo') or SFT (mode='sft'). kw: model, tokenizer, ref_model, train/eval_examples."""
    return Trainer(cfg, mode, **kw).run()
