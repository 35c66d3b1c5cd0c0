"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task, in several seeds (see pipeline.py).

Each name is imported when first used (PEP 562): `DemoConfig` (config.py) and the profiles load without torch, the
pipeline when `run` is first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"config": ("DemoConfig",), "pipeline": ("run",), "profile": ("PROFILES", "Profile")}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name in _MODULE:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
