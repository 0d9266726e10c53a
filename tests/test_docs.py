"""The documentation site builds without warnings (broken links, missing pages, bad API refs)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is missing: pip install -e '.[docs]' (the test extra includes it)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "agents" / "index.html").is_file()
    api = (tmp_path / "site" / "reference" / "chat" / "index.html").read_text()
    assert "GenerationConfig" in api and "quantize_model" in api  # generated from the docstrings
