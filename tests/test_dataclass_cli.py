"""The dataclass -> argparse bridge behind every `glmgym` command."""

import argparse
from dataclasses import dataclass, field

import pytest

from glmgym._dataclass_cli import add_dataclass_arguments, dataclass_from_namespace, field_docs


@dataclass
class Options:
    """A config like the real ones."""

    name: str = field(default="", metadata={"required": True, "metavar": "NAME"})
    """Who to greet."""
    times: int = 2
    """How many times."""
    scale: float | None = None
    """Optional scale."""
    loud: bool = False
    """Shout."""
    targets: tuple[float, ...] | None = field(default=None, metadata={"flag": "--target", "metavar": "R"})
    """Target values."""
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    """A or B."""


def _parse(argv):
    p = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(p, Options)
    return p, dataclass_from_namespace(Options, p.parse_args(argv))


def test_fields_become_typed_options_with_defaults():
    _, o = _parse(["--name", "x"])
    assert o == Options(name="x")
    _, o = _parse(["--name", "x", "--times", "3", "--scale", "0.5", "--loud", "--target", "1", "2.5",
                   "--mode", "b"])
    assert o == Options("x", 3, 0.5, True, (1.0, 2.5), "b")
    assert isinstance(o.targets, tuple)  # argparse's list becomes the declared tuple
    _, o = _parse(["--name", "x", "--no-loud"])
    assert o.loud is False


def test_help_comes_from_the_attribute_docstrings():
    p, _ = _parse(["--name", "x"])
    text = p.format_help()
    assert "Who to greet." in text and "How many times. (default: 2)" in text
    assert "--target R [R ...]" in text and "--name NAME" in text
    assert field_docs(Options)["mode"] == "A or B."


@pytest.mark.parametrize("argv", [[], ["--name", "x", "--times", "many"], ["--name", "x", "--mode", "c"]])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_overrides_win_over_parsed_values():
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Options)
    ns = p.parse_args(["--name", "x", "--times", "5"])
    assert dataclass_from_namespace(Options, ns, times=1).times == 1


def test_resumed_keeps_the_runs_options_and_refuses_changes():
    from glmgym.errors import GlmgymError
    from glmgym.runs import resumed

    saved = {"name": "run", "times": 5, "scale": None, "loud": True, "targets": [1.0, 2.0], "mode": "b"}
    cfg = resumed(Options(name="run"), saved, ("times",))  # nothing else given: the run's values
    assert cfg == Options("run", 5, None, True, (1.0, 2.0), "b")
    assert resumed(Options(name="run", times=9), saved, ("times",)).times == 9
    with pytest.raises(GlmgymError, match="cannot change --scale"):
        resumed(Options(name="run", scale=0.5), saved, ("times",))
