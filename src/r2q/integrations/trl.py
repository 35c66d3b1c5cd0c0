"""Per-token credit inside a running TRL `DPOTrainer`, as a `transformers.TrainerCallback`.

    from r2q.integrations.trl import CreditCallback

    trainer = DPOTrainer(model=..., ref_model=..., args=DPOConfig(...), train_dataset=..., ...)
    trainer.add_callback(CreditCallback(trainer, rows=eval_rows[:8], every=50))
    trainer.train()

Every `every` optimizer steps it scores the same preference rows with the policy in memory and the trainer's own
reference (its `ref_model`, or the policy with its LoRA adapters off when TRL trains a PEFT model without one), at
the trainer's beta. It writes the credit (`credit/step-N.json`, and `credit/step-N.html` unless html=False) into
the trainer's output directory, and logs the summary (`credit/rewards/margins`, ...) through `trainer.log`, so
every tracker the trainer reports to gets it; when wandb is one of them, also a table of every token's reward.
The numbers are those `r2q credit --model <checkpoint> --ref <reference> --beta <beta>` gives on that checkpoint.

Scoring runs the unwrapped model on the main process only: fine for one process and for DDP, not for sharded
training (FSDP, DeepSpeed ZeRO-3), where a forward on one rank alone would wait for the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..credit import CreditReport, score_examples
from ..data import preference_examples_from_rows
from ..errors import UserError, check_beta, check_count
from ..reference import AdaptersOff, LiveReference, NoReference, Reference
from ..views.html import write_html


class CreditCallback(TrainerCallback):
    """Credit of fixed preference rows every `every` steps of a TRL DPOTrainer (see the module's docstring).

    rows: preference rows in any format r2q reads (TRL's prompt/chosen/rejected strings or messages); default: the
    first `n` rows of the trainer's eval data set, when it still holds those columns. beta: default the trainer's
    `args.beta`. out_dir: default `<args.output_dir>/credit`."""

    def __init__(self, trainer, rows: Sequence[Mapping] | None = None, n: int = 8, every: int = 100,
                 beta: float | None = None, out_dir: str | Path | None = None, html: bool = True,
                 max_length: int = 1024, max_prompt_length: int = 512, delimiter: str | None = "\n"):
        check_count(every, "every", " (steps)")
        self.trainer, self.every, self.html, self.delimiter = trainer, every, html, delimiter
        self.rows = list(rows) if rows is not None else _eval_rows(trainer, n)
        if not self.rows:
            raise UserError("CreditCallback has no rows to score: pass rows=")
        self.beta = beta if beta is not None else float(getattr(trainer.args, "beta", 0.1))
        check_beta(self.beta)  # now, not at the first scoring `every` steps into the run
        self.out_dir = Path(out_dir) if out_dir else Path(trainer.args.output_dir) / "credit"
        self.examples, _ = preference_examples_from_rows(self.rows, trainer.processing_class, max_length,
                                                         max_prompt_length)
        self.reports: dict[int, CreditReport] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.score(state.global_step, state.is_world_process_zero)
        return control

    def score(self, step: int, main: bool = True) -> CreditReport | None:
        """Score the rows now with the policy as it is (main process only); write and log the result."""
        if not main:
            return None
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model)
        report = score_examples(policy, reference_of(trainer, policy), trainer.processing_class, self.examples,
                                self.beta, delimiter=self.delimiter, use_cache=False)
        report.meta.update(step=step, source="r2q.integrations.trl.CreditCallback")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report.to_json(self.out_dir / f"step-{step}.json")
        if self.html:
            write_html(report, self.out_dir / f"step-{step}.html", title=f"r2q credit at step {step}")
        trainer.log({f"credit/{k}": v for k, v in report.summary.items()})
        _wandb_table(trainer.args, report, step)
        self.reports[step] = report
        return report


def reference_of(trainer, policy) -> Reference:
    """The reference a TRL DPOTrainer trains against: its ref_model; with none, the PEFT policy with its adapters
    off; reference-free when the trainer says so."""
    if getattr(trainer.args, "reference_free", False):
        return NoReference()
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        return LiveReference(trainer.accelerator.unwrap_model(ref))
    if hasattr(policy, "disable_adapter"):
        return AdaptersOff(lambda: policy)
    raise UserError("the trainer has no ref_model and its model has no adapters to switch off: give DPOTrainer a "
                    "ref_model (or train with PEFT)")


def _eval_rows(trainer, n: int) -> list[dict[str, Any]]:
    ds = getattr(trainer, "eval_dataset", None)
    if ds is None or not all(k in getattr(ds, "column_names", ()) for k in ("chosen", "rejected")):
        raise UserError("CreditCallback needs rows=: the trainer's eval data set has no chosen/rejected columns")
    keys = [k for k in ("prompt", "chosen", "rejected") if k in ds.column_names]
    eos = getattr(trainer.processing_class, "eos_token", None) or "\0"

    def unended(k: str, v):  # TRL's prepared set carries its EOS in the text; r2q appends its own
        return v[: -len(eos)] if k != "prompt" and isinstance(v, str) and v.endswith(eos) else v

    return [{k: unended(k, ds[i][k]) for k in keys} for i in range(min(n, len(ds)))]


def _wandb_table(args, report: CreditReport, step: int) -> None:
    """Every scored token's reward as a wandb Table, when wandb is one of the trainer's trackers and has a run."""
    if "wandb" not in (getattr(args, "report_to", None) or []):
        return
    import wandb  # the trainer reports to wandb, so it is installed

    if wandb.run is None:
        return
    rows = [[i, side, t, tok, r] for i, p in enumerate(report.pairs)
            for side, c in (("chosen", p.chosen), ("rejected", p.rejected))
            for t, (tok, r) in enumerate(zip(c.tokens, c.rewards))]
    wandb.log({"credit/tokens": wandb.Table(columns=["pair", "side", "position", "token", "reward"], data=rows)})
