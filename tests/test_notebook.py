"""CI runs notebooks/quickstart.ipynb top to bottom on the CPU; any failing cell fails the test.

The kernel is this interpreter (``sys.executable``), through a kernel spec
written to a temporary folder, so the notebook sees the same environment as the
tests no matter which ``python3`` kernels the machine has installed.
"""

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("jax")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
BUDGET_S = 180


def this_interpreter_kernel(tmp_path: Path) -> KernelManager:
    spec_dir = tmp_path / "kernels" / "ghostvis-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ghostvis tests", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="ghostvis-test", kernel_spec_manager=specs)


def test_notebook_outputs_are_stripped():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} has outputs committed"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, km=this_interpreter_kernel(tmp_path), timeout=BUDGET_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    took = time.perf_counter() - start
    assert took < BUDGET_S, f"the quickstart took {took:.0f}s, over its {BUDGET_S}s budget"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
