"""The one progress bar every long loop shows (training, scoring, tokenising, decoding), on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(enabled: bool, transient: bool = False) -> Progress:
    """A rich Progress: description, bar, done/total, elapsed, eta and a free `info` field (add_task(...,
    info="")). Disabled: every call is a no-op. transient: the bar is removed when it finishes."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    disable=not enabled, transient=transient, console=Console(stderr=True))
