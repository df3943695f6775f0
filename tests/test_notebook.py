from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    # the notebook's one budget parameter, set low as papermill would: every cell still runs
    cells = [c for c in nb.cells if c.cell_type == "code" and "EPOCHS = 5" in c.source]
    assert len(cells) == 1
    cells[0].source = cells[0].source.replace("EPOCHS = 5", "EPOCHS = 1")
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # UnitMem, LayerMem, pruning, fine-tuning plots inline
