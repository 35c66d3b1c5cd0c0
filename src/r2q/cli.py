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
err = Console(stderr=True)
out = Console()


@app.command()
def version() -> None:
    """Print the r2q version."""
    out.print(f"r2q {__version__}")


@app.command("inspect-data")
def inspect_data(
    data: Annotated[Path, typer.Argument(help="Preference or SFT data: .jsonl, .json, .parquet, .csv or a dataset dir")],
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=argv, prog_name="r2q")
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
