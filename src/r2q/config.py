"""Config dataclass fields that carry their CLI help text (the CLI is generated from them)."""

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help line `r2q` shows for its --option."""
    return field(default=default, metadata={"help": help})
