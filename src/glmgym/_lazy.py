"""Lazy package exports: `from glmgym.chat import load` imports `glmgym.chat.session` on first use.

A pillar's `__init__` re-exports its public API; importing it all eagerly would pull torch into
every import of the package, `glmgym --help` included (about 2 s on a laptop, 10 s and more on a
busy 2-core runner). Only the names' homes are declared; each loads on first access.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["lazy_exports"]


class _LazyPackage(types.ModuleType):
    """A package whose exported names load on first access."""

    _homes: dict[str, str]

    def __getattr__(self, name: str):
        homes = self.__dict__.get("_homes", {})
        if name not in homes:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{homes[name]}"), name)
        self.__dict__[name] = value  # once loaded, a plain attribute
        return value

    def __setattr__(self, name: str, value) -> None:
        # After importing a submodule, the import system binds it on its package; where the
        # package exports a function of the same name (`agents.train`, `chat.generate`), the
        # export keeps the name, as it did when the package imported everything eagerly.
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_homes", {}):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self._homes})


def lazy_exports(package: str, homes: dict[str, str]) -> None:
    """Make `package` (its own `__name__`) load each name of `homes` from `package.<home>`."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_homes"] = homes
