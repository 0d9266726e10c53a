"""The quickstart notebook runs top to bottom (small settings) through nbclient."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMGYM_NB_STEPS", "30")
    monkeypatch.setenv("GLMGYM_NB_EPISODES", "2")
    monkeypatch.setenv("GLMGYM_NB_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("GLMGYM_NB_VIDEO_SIZE", "64")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots are shown
    assert any("text/html" in o.get("data", {}) and "<video" in o["data"]["text/html"] for o in outputs)
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "episode.mp4").exists()
