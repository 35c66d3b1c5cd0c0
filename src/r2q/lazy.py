"""A package's public names, each imported from its submodule when first used (PEP 562), so that importing the
package (and `r2q --help`) loads no torch. Used by the `__init__` of r2q and of its packages."""

from __future__ import annotations

import importlib
import sys
from typing import Any


class Exports:
    """`where` maps each submodule to the names it provides; `eager` are names the package defines itself."""

    def __init__(self, package: str, where: dict[str, tuple[str, ...]], eager: tuple[str, ...] = ()):
        self.package = package
        self.module = {name: mod for mod, names in where.items() for name in names}
        self.names = sorted([*self.module, *eager])

    def getattr(self, name: str) -> Any:
        if name in self.module:
            return getattr(importlib.import_module(f"{self.package}.{self.module[name]}"), name)
        raise AttributeError(f"module {self.package!r} has no attribute {name!r}")

    def dir(self) -> list[str]:
        return sorted(set(vars(sys.modules[self.package])) | set(self.names))
