"""The results pages: `benchmarks/report.py` makes them from the results files, and the committed
tables are what those files say."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ("dt_table.png", "dt_sweep.png", "chat_speed.png", "serve_load.png", "speculative.png",
         "quickstart_schedule.png")


def test_report_makes_the_committed_tables_and_the_plots(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--tables", str(tmp_path / "t"),
                    "--plots", str(tmp_path / "p")], check=True, capture_output=True, text=True)
    made = {p.name: p.read_text() for p in (tmp_path / "t").glob("*.md")}
    committed = {p.name: p.read_text() for p in (ROOT / "docs" / "results").glob("*.md")}
    tables = {"dt_table.md", "dt_sweep.md", "chat_speed.md", "serve_load.md", "finetune.md", "dt_speed.md",
              "family_speed.md", "speculative.md", "quickstart.md", "dt_variant.md", "gpu_speed.md",
              "dt_heldout.md"}
    assert set(made) == tables
    for name, text in made.items():
        assert committed.get(name) == text, f"docs/results/{name} is stale: run python benchmarks/report.py"
    for plot in PLOTS:
        data = (tmp_path / "p" / plot).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, plot
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in made:  # every table is on the page, every plot too
        assert f'--8<-- "results/{name}"' in page
    for plot in PLOTS:
        assert f"img/{plot}" in page
