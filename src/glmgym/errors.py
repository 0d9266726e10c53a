"""The one exception type for user errors, and the check for optional dependencies.

Anything the user can fix (a missing file, a malformed dataset, an impossible option, a missing
extra) raises `GlmgymError`; the CLI prints its message and exits with code 2 without a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["GlmgymError", "import_extra"]


class GlmgymError(Exception):
    """A user error: bad input, a missing file, an impossible option."""


def import_extra(module: str, extra: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it.

    Args:
        module: the module to import, e.g. "sentencepiece".
        extra: the glmgym extra that brings it, e.g. "chat".

    Raises:
        GlmgymError: the module is not installed; the message names `pip install 'glmgym[extra]'`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".")[0]
        raise GlmgymError(f"this needs {root}, which is not installed (or failed to import: {exc}); "
                          f"install the extra: pip install 'glmgym[{extra}]'") from exc
