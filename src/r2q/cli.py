"""The `r2q` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Token-level DPO: train a policy, see which tokens it rewards, and search over it.",
)
out = Console()


@app.command()
def version() -> None:
    """Print the r2q version."""
    out.print(f"r2q {__version__}")


@app.command("inspect-data")
def inspect_data(
    data: Annotated[Path, typer.Argument(help="Preference or SFT data (.jsonl, .json, .parquet, .csv, dataset dir)")],
    model: Annotated[str, typer.Option(help="Model (or tokenizer) directory whose tokenizer to use")],
    max_length: Annotated[int, typer.Option(help="Max tokens of prompt + completion")] = 1024,
    max_prompt_length: Annotated[int, typer.Option(help="Max prompt tokens (cut from the left)")] = 512,
) -> None:
    """Counts, token length percentiles, truncation and bad rows of a data file."""
    from .data import inspect_data as _inspect
    from .models import load_tokenizer

    info = _inspect(data, load_tokenizer(model), max_length=max_length, max_prompt_length=max_prompt_length)
    table = Table(title=f"{data} ({info['kind']}, {info['format']})")
    table.add_column("field")
    for col in ("p50", "p90", "p99", "max"):
        table.add_column(col, justify="right")
    for field, pct in info["lengths"].items():
        table.add_row(field, *(str(pct[c]) for c in ("p50", "p90", "p99", "max")))
    out.print(table)
    out.print(
        f"rows {info['rows']}  kept {info['kept']}  skipped {info['skipped']}  "
        f"prompt truncated {info['prompt_truncated']}  completion truncated {info['completion_truncated']}"
    )
    for msg in info["skipped_messages"]:
        out.print(f"  skipped: {msg}", markup=False, highlight=False)


def _options_from(cls):
    """Turn a config dataclass into a typer signature: one --option per field, help from field metadata."""
    import dataclasses
    import inspect

    params = []
    for f in dataclasses.fields(cls):
        name = f.type if isinstance(f.type, str) else f.type.__name__
        typ = {"int": int, "float": float, "str": str, "bool": bool}[name]
        opt = typer.Option(help=f.metadata.get("help", ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=Annotated[typ, opt]))
    return inspect.Signature(params)


def _train_command(name: str, mode: str, doc: str) -> None:
    from .train import TrainConfig

    def command(**kw) -> None:
        from .train import train

        cfg = TrainConfig(**kw)
        for req in ("model", "data", "out"):
            if not getattr(cfg, req):
                raise UserError(f"--{req} is required")
        res = train(cfg, mode=mode)
        final = {k: v for k, v in (res.metrics[-1] if res.metrics else {}).items() if isinstance(v, float)}
        out.print(f"{name}: {res.steps} steps, model saved to {res.out}")
        if final:
            out.print("  ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:8]), highlight=False)

    command.__signature__ = _options_from(TrainConfig)
    command.__doc__ = doc
    app.command(name)(command)


_train_command("train", "dpo", "Token-level DPO training of a causal LM on preference pairs.")
_train_command("sft", "sft", "Supervised fine-tuning on completions (prompt/completion, text, messages or chosen).")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        app(args=argv, prog_name="r2q")
    except UserError as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
