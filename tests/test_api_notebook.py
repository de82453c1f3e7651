"""``examples/quickstart.ipynb`` runs, top to bottom, in a real Jupyter kernel (nbclient + ipykernel), so the
notebook the docs point to cannot rot. Its parameters cell (tagged ``parameters``, as papermill does) is
replaced by the test suite's tiny recipe on the shared demo data; every other cell runs as committed,
and the notebook itself asserts that ``Model.evaluate``'s AUROC is the run's."""

import json
from pathlib import Path

import pytest
from tiny import tiny_recipe_data

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_its_auroc_is_the_runs(demo_data, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1
    recipe = tiny_recipe_data(demo_data, cache={"dir": str(tmp_path / "cache")}, logging={"tensorboard": False})
    parameters[0].source = (f"DATA_DIR = {str(demo_data)!r}\nRECIPE = {recipe!r}\nOVERRIDES = {{}}\n"
                            f"OUT = {str(tmp_path / 'run')!r}\n")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {k: cell.outputs for k, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    assert not [out for cell in outputs.values() for out in cell if out.output_type == "error"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    printed = "".join(out.get("text", "") for cell in outputs.values() for out in cell if out.output_type == "stream")
    assert f"test AUROC {results['test']['at_threshold']['auroc']}" in printed
    last = notebook.cells[-1].outputs[-1]["data"]["text/plain"]  # the metrics the evaluate cell shows
    assert f"'auroc': {results['test']['at_threshold']['auroc']}" in last
