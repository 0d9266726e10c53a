"""Generate argparse options from a config dataclass, so that defaults live in one place.

Each field becomes `--field-name`; its help text is the attribute docstring written under the field
(read from the source with `ast`, the way cleanrl/tyro document their configs). A field can rename
its flag with `metadata={"flag": "--other"}`; `metadata` may also set "metavar", "choices" and
"required". bool fields become `--x / --no-x`, tuple fields take one or more values.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any

__all__ = ["add_dataclass_arguments", "dataclass_from_namespace", "field_docs"]


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: attribute docstring} for a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source available (frozen app): no help text
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per field of `cls` to `parser` (defaults and help from the dataclass)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            elem = typing.get_args(tp)[0]
            kwargs.update(type=elem, nargs="+", metavar=f.metadata.get("metavar", elem.__name__.upper()))
        else:
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.metadata.get("metavar", None)
        if f.metadata.get("required"):
            kwargs["required"] = True
        elif default is not None and tp is not bool:
            help_text += f" (default: {default})"
        parser.add_argument(flag, help=help_text.strip(), **kwargs)


def dataclass_from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any):
    """Build `cls` from parsed arguments (fields missing from `ns` keep their defaults)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    values.update(overrides)
    for f in dataclasses.fields(cls):  # lists from argparse become the tuples the config declares
        if isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)
