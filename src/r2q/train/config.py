"""Options of `r2q train` and `r2q sft` (one dataclass, from which the CLI is generated), and the checks that
options make together. No torch here: the command line builds and checks these before it loads anything."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..config import attention_option, check_attention, check_options, check_prompt_fits, flag, option
from ..data.read import check_choices
from ..errors import UserError

# the losses r2q.losses.dpo_loss computes, named here too so the options load without torch (a test keeps the two equal)
LOSS_TYPES = ("sigmoid", "ipo", "cdpo")


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
    label_smoothing: float = option(0.0, "cDPO label noise epsilon, in [0, 0.49] (--loss cdpo only)", ge=0, le=0.49)
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
    attn_implementation: str = attention_option()
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
    report_to: str = option("auto", "Trackers that get the metrics besides D/metrics.jsonl: comma-separated names of "
                            "accelerate's trackers (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, "
                            "swanlab, trackio), 'all' (every one installed), 'none', or 'auto' (tensorboard when "
                            "installed). Metric names are TRL's; eval metrics are prefixed eval_. Each tracker reads "
                            "its own settings from the environment (WANDB_MODE, MLFLOW_TRACKING_URI, ...)")
    run_name: str = option("", "Run name for the trackers (default: the name of --out)")
    skip_bad: bool = option(False, "Skip malformed rows (counted and reported) instead of stopping")
    trust_remote_code: bool = option(False, "Run Python code shipped in the model's directory (transformers' "
                                     "trust_remote_code); off: only installed code runs")
    quiet: bool = option(False, "No progress bar")

    def __post_init__(self):
        check_options(self)
        check_attention(self.attn_implementation)


# options that may differ between a run and its resumption: they change neither the updates nor the data
FREE_ON_RESUME = {"resume", "overwrite", "quiet", "eval_every", "eval_on_start", "save_every", "keep_last",
                  "log_every", "report_to", "run_name", "cache_dir", "precompute_ref", "trust_remote_code", "eval_data",
                  "eval_split", "out", "attn_implementation"}  # (kernels of the same attention)


DPO_ONLY = ("ref", "beta", "loss", "label_smoothing", "precompute_ref", "keep_dropout", "pack")


def validate(cfg: TrainConfig, mode: str) -> None:
    """What the ranges of single options cannot say (those are checked when the config is made)."""
    if mode not in ("dpo", "sft"):
        raise UserError(f"mode must be 'dpo' or 'sft'; got {mode!r}")
    if not cfg.out:
        raise UserError("--out is required")
    trackers(cfg.report_to)
    if cfg.label_smoothing and cfg.loss != "cdpo":
        raise UserError(f"--label-smoothing is for --loss cdpo (got --loss {cfg.loss})")
    check_prompt_fits(cfg.max_length, cfg.max_prompt_length)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one")
    if cfg.fsdp and cfg.lora_r:
        raise UserError("--fsdp with --lora-r is not supported yet; LoRA trains few enough weights for DDP")
    if cfg.pack and not cfg.share_prefix:
        raise UserError("--pack packs prefix-shared pairs; it cannot be used with --no-share-prefix")
    lora_set = given(cfg, ("lora_alpha", "lora_dropout", "lora_target_modules", "merge"))
    if lora_set and not cfg.lora_r:
        raise UserError(f"{flag(lora_set[0])} is a LoRA option; give --lora-r too")
    if cfg.lora_dropout and mode == "dpo" and not cfg.keep_dropout:
        raise UserError("--lora-dropout would be turned off with the rest of the dropout in DPO; add --keep-dropout")
    if mode == "sft" and (dpo_set := given(cfg, DPO_ONLY)):
        raise UserError(f"{flag(dpo_set[0])} is a DPO option (r2q train); r2q sft does not use it")
    check_combinations(cfg, mode)


def check_combinations(cfg: TrainConfig, mode: str) -> None:
    """Options that would be ignored, or that contradict each other, given what else is set."""
    if mode == "dpo" and cfg.ref == "none" and cfg.precompute_ref:
        raise UserError("--precompute-ref caches the reference's log-probs, and --ref none trains without a "
                        "reference: drop one of them")
    if cfg.eval_data and cfg.eval_fraction:
        raise UserError("--eval-data and --eval-fraction both choose the evaluation data: give one of them")
    if cfg.eval_split != TrainConfig.eval_split and not cfg.eval_data:
        raise UserError("--eval-split chooses within --eval-data, which is not given (--eval-fraction holds out part "
                        "of --data)")
    choices = {"--split": cfg.data if cfg.split != TrainConfig.split else "",
               "--eval-split": cfg.eval_data if cfg.eval_split != TrainConfig.eval_split else ""}
    if cfg.subset and all(not d or Path(d).is_file() for d in (cfg.data, cfg.eval_data)):
        choices["--subset"] = cfg.data
    check_choices(choices)


def given(cfg: TrainConfig, names) -> list[str]:
    """The options among `names` set to something other than their default."""
    return [n for n in names if getattr(cfg, n) != getattr(TrainConfig, n)]


# accelerate's trackers and the module each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def trackers(report_to: str) -> list[str]:
    """The trackers --report-to asks for, each checked to be installed (without importing it)."""
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    installed = [t for t, module in TRACKERS.items() if importlib.util.find_spec(module) is not None]
    if names in ([], ["none"]):
        return []
    if names == ["auto"]:
        return ["tensorboard"] if "tensorboard" in installed else []
    if names == ["all"]:
        return installed
    for n in names:
        if n not in TRACKERS:
            raise UserError(f"--report-to {n}: not a tracker; choose from {', '.join(TRACKERS)}, all, none or auto")
        if n not in installed:
            raise UserError(f"--report-to {n}: {TRACKERS[n]} is not installed (pip install {TRACKERS[n]})")
    return list(dict.fromkeys(names))
