"""The results pages: `benchmarks/report.py` makes them from the results files, and the committed
tables are what those files say."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ("dt_table.png", "dt_sweep.png", "chat_speed.png", "serve_load.png", "speculative.png",
         "quickstart_schedule.png", "dt_step_parity.png")


def test_report_makes_the_committed_tables_and_the_plots(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--tables", str(tmp_path / "t"),
                    "--plots", str(tmp_path / "p")], check=True, capture_output=True, text=True)
    made = {p.name: p.read_text() for p in (tmp_path / "t").glob("*.md")}
    committed = {p.name: p.read_text() for p in (ROOT / "docs" / "results").glob("*.md")}
    tables = {"dt_table.md", "dt_sweep.md", "chat_speed.md", "serve_load.md", "finetune.md", "dt_speed.md",
              "family_speed.md", "speculative.md", "chat_kernels.md", "quickstart.md", "dt_variant.md",
              "gpu_speed.md", "dt_heldout.md", "dt_tokens.md", "dt_average.md",
              "dt_step_parity.md"}
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


def _load_report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dt_table_refuses_a_row_whose_columns_ran_on_different_files(tmp_path, monkeypatch):
    report = _load_report()
    summary = {"normalized_score_mean": 50.0, "normalized_score_std": 1.0, "seeds": [0]}
    run = {"cpu": "avx2"}

    def entry(sha):
        return {"config": {"dataset_sha256": sha}, "dataset": summary, "bc": summary,
                "glmgym_dt": summary, "runs": {"glmgym_dt/0": run}}

    (tmp_path / "dt_quality.json").write_text(
        json.dumps({"datasets": {"walker2d-medium-replay": entry("a" * 64)}}))
    (tmp_path / "dt_init_paper_walker2d.json").write_text(
        json.dumps({"datasets": {"walker2d-medium-replay": entry("a" * 64)}}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    out, img = tmp_path / "t", tmp_path / "p"
    out.mkdir(), img.mkdir()
    report.dt_table(out, img)  # same file: the row is made
    assert "| walker2d-medium-replay | 50.0 |" in (out / "dt_table.md").read_text()

    (tmp_path / "dt_init_paper_walker2d.json").write_text(
        json.dumps({"datasets": {"walker2d-medium-replay": entry("b" * 64)}}))
    with pytest.raises(SystemExit, match=r"dt_init_paper_walker2d\.json: walker2d-medium-replay ran on"):
        report.dt_table(out, img)


def test_the_dt_table_gives_each_rows_gap_to_d3rlpy_with_welchs_t(tmp_path, monkeypatch):
    report = _load_report()
    # seeds 95.5, 81.6, 101.2 (d3rlpy) and 87.0, 89.5, 88.7 (glmgym) as numpy's mean and std
    d3rlpy = {"normalized_score_mean": 92.7667, "normalized_score_std": 8.2318, "seeds": [0, 1, 2]}
    glmgym = {"normalized_score_mean": 88.4, "normalized_score_std": 1.0424, "seeds": [0, 1, 2]}
    assert report.welch_t(glmgym, d3rlpy) == pytest.approx(-0.744, abs=1e-3)  # by hand from the seeds
    assert report.welch_t(glmgym, {**d3rlpy, "seeds": [0]}) is None  # one seed: no deviation
    entry = {"config": {"dataset_sha256": "a" * 64}, "dataset": glmgym, "bc": glmgym, "d3rlpy_dt": d3rlpy,
             "runs": {"glmgym_dt/0": {"cpu": "avx2"}}}
    (tmp_path / "dt_quality.json").write_text(json.dumps({"datasets": {"halfcheetah-medium-expert": entry}}))
    (tmp_path / "dt_init_paper_halfcheetah.json").write_text(
        json.dumps({"datasets": {"halfcheetah-medium-expert": {**entry, "glmgym_dt": glmgym}}}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    out, img = tmp_path / "t", tmp_path / "p"
    out.mkdir(), img.mkdir()
    report.dt_table(out, img)
    row = next(line for line in (out / "dt_table.md").read_text().splitlines()
               if line.startswith("| halfcheetah-medium-expert"))
    assert row.endswith("| -4.4 (-0.7) |")


def test_the_dt_table_pools_each_columns_seed_spread_over_the_rows(tmp_path, monkeypatch):
    report = _load_report()
    rows = report.DT_ROWS
    stds = [3.0 * (i % 2) + 1.0 for i in range(len(rows))]  # 1, 4, 1, 4, ...: rms sqrt(mean(std^2))

    def summary(std, seeds=(0, 1, 2)):
        return {"normalized_score_mean": 50.0, "normalized_score_std": std, "seeds": list(seeds)}

    def entry(i):
        refs = {"min": -1.0, "max": 100.0 + (i == 2)}  # one row from another collection run
        return {"config": {"dataset_sha256": "a" * 64, "reference_scores": refs},
                "dataset": summary(9.0, ()), "bc": summary(2.0),
                "d3rlpy_dt": summary(2.0), "glmgym_dt": summary(stds[i], seeds=(0,)),
                "runs": {"glmgym_dt/0": {"cpu": "avx2"}}}

    (tmp_path / "dt_quality.json").write_text(
        json.dumps({"datasets": {n: entry(i) for i, n in enumerate(rows)}}))
    (tmp_path / "dt_init_paper_all.json").write_text(json.dumps(
        {"datasets": {n: {**entry(i), "glmgym_dt": summary(stds[i])} for i, n in enumerate(rows)}}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    out, img = tmp_path / "t", tmp_path / "p"
    out.mkdir(), img.mkdir()
    report.dt_table(out, img)
    line = next(x for x in (out / "dt_table.md").read_text().splitlines() if x.startswith("| seed std"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    expected = f"{(sum(s * s for s in stds) / len(stds)) ** 0.5:.1f}"
    # data mean: an episode spread, not a seed spread; start windows: one seed a row, no deviation
    assert cells[1:] == ["—", "2.0", "2.0", "—", "—", expected,
                         f"default's std ≤ d3rlpy's on {stds.count(1.0)} of {len(rows)} rows"]
    others = ", ".join(rows[:2] + rows[3:])  # each row's references, grouped
    text = (out / "dt_table.md").read_text()
    assert f"different scales: {others} -1.0 / 100.0; {rows[2]} -1.0 / 101.0." in text
