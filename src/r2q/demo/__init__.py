"""`r2q demo`: the paper's three findings on the built-in imdb-sentiment task, in several seeds (see pipeline.py).

Each name is imported when first used (PEP 562): `DemoConfig` (config.py) and the profiles load without torch, the
pipeline when `run` is first asked for.
"""

from __future__ import annotations

from ..lazy import Exports

_WHERE = {"config": ("DemoConfig",), "pipeline": ("run",), "profile": ("PROFILES", "Profile")}
_EXPORTS = Exports(__name__, _WHERE)
_MODULE, __all__ = _EXPORTS.module, _EXPORTS.names
__getattr__, __dir__ = _EXPORTS.getattr, _EXPORTS.dir
