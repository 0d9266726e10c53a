"""The README's examples run as written, and its Quickstart stays what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_agents_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its run directory goes under ./runs
    (code,) = _python_blocks("Agents in ten lines")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Hopper-v5" in out and "3600" in out  # format_report's table for the one target
    assert len(list((tmp_path / "runs").glob("dt-hopper-medium-*/checkpoints/step_*"))) == 1


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    block = README.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    install_and_train, tests = block.strip().splitlines()
    assert "pip install" in install_and_train and install_and_train.endswith("glmgym agent train")
    assert tests == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[test]"' in ci and "pytest -q" in ci
    assert "rm -rf .venv\n" not in ci  # the first command's environment survives the tests


def test_readme_stays_short():
    assert len(README.splitlines()) <= 150
