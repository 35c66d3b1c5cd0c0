"""Options of `r2q credit` (the CLI is generated from them), apart from the scoring in r2q.credit so that the
command line builds and checks them without loading torch. r2q.credit re-exports `CreditConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from .config import attention_option, check_attention, check_options, check_prompt_fits, option
from .data.read import check_choices
from .errors import UserError


@dataclass
class CreditConfig:
    """Options of `r2q credit`; the CLI is generated from these fields."""

    model: str = option("", "Policy (DPO) model directory")
    ref: str = option("", "Reference model; default: the one r2q train recorded; 'none' = reference-free")
    beta: float | None = option(None, "beta of the rewards", gt=0, shown="the one r2q train recorded, else 0.1")
    data: str = option("", "Pairs (prompt/chosen/rejected) or completions to score: a file, a data set directory or a "
                           "hub data set ORG/NAME")
    split: str = option("train", "Split of --data when it is a data set")
    subset: str = option("", "Configuration of a hub data set")
    prompt: str | None = option(None, "A prompt (with --response), instead of --data (\"\" for an empty one: BOS "
                                "alone)")
    response: str | None = option(None, "The response to --prompt (\"\" for an empty one: EOS alone)")
    html: str = option("", "Write a self-contained HTML heatmap here")
    json: str = option("", "Write the per-token numbers as JSON here")
    png: str = option("", "Write a PNG figure here")
    delimiter: str = option("\n", "Step delimiter for per-step sums (a conversation of several messages is "
                            "summed per message instead: per-turn credit)")
    batch_size: int = option(16, "Pairs per forward", ge=1)
    max_length: int = option(1024, "Max tokens of prompt + completion", ge=2)
    max_prompt_length: int = option(512, "Max prompt tokens (cut from the left); less than --max-length", ge=1)
    cache_dir: str = option("", "Reference log-prob cache (as r2q train --cache-dir)")
    share_prefix: bool = option(True, "Run each pair's prompt once")
    show: int = option(5, "Items shown in the terminal (0: the summary only)", ge=0)
    top_k: int = option(20, "Most rewarded and most penalised tokens listed", ge=1)
    min_count: int = option(0, "Tokens listed must occur this often (0: automatic)", ge=0)
    dtype: str = option("fp32", "fp32, bf16 or fp16 weights", choices=("fp32", "bf16", "fp16"))
    attn_implementation: str = attention_option()
    skip_bad: bool = option(False, "Skip malformed rows instead of stopping")
    quiet: bool = option(False, "No progress bar")
    trust_remote_code: bool = option(False, "Run Python code shipped in the model's directory "
                                     "(transformers' trust_remote_code); off: only installed code runs")

    def __post_init__(self):
        check_options(self)
        check_attention(self.attn_implementation)
        check_prompt_fits(self.max_length, self.max_prompt_length)
        if self.png and not self.png.lower().endswith(".png"):
            raise UserError(f"--png {self.png}: the figure is written as PNG, so its name must end in .png")
        check_choices({"--split": self.data if self.split != "train" else "", "--subset": self.data if self.subset
                       else ""})
