"""examples/quickstart.ipynb runs from top to bottom and shows a robust model and a landscape figure.

The notebook is executed with nbclient in a temporary copy (the stored notebook has no outputs). Its install cell is
told by ``ROBUST_FLAT_NOTEBOOK_TEST=1`` to install nothing. The kernel is this interpreter (``sys.executable``): a
kernelspec written to a temporary ``JUPYTER_PATH`` (searched before the user's and the environment's kernelspecs)
points at it, so another ``python3`` kernel installed on the machine cannot run the notebook instead.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _kernelspec(tmp_path) -> str:
    """A ``python3`` kernelspec for this interpreter in a fresh Jupyter data dir; returns that dir."""
    data_dir = tmp_path / "jupyter"
    spec_dir = data_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (robust-flat tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(data_dir)


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


def test_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before committing"


@pytest.mark.slow  # ~1 min on an idle 2-core machine (compiles dominate)
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    work = tmp_path / "examples"
    work.mkdir()
    path = work / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, path)
    nb = nbformat.read(str(path), as_version=4)
    # one extra cell: which interpreter ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL_PYTHON=' + sys.executable)"))

    monkeypatch.setenv("ROBUST_FLAT_NOTEBOOK_TEST", "1")
    monkeypatch.setenv("JUPYTER_PATH", _kernelspec(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's %matplotlib inline sets it anyway
    # the kernel compiles as a user's does: XLA's default optimization level (the test session compiles
    # unoptimized, tests/conftest.py; the notebook trains a model, where running costs more than compiling)
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                             if not f.startswith("--xla_backend_optimization_level")))
    # robust_flat and experiments from this checkout, even if the environment's install points elsewhere
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))

    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept in tmp_path for inspection

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(_text(o) for o in outputs)
    assert f"KERNEL_PYTHON={sys.executable}" in text
    assert "ROBUST_FLAT_NOTEBOOK_TEST=1" in text  # the install cell saw the variable and installed nothing

    rising = [float(v) for v in re.findall(r"PGD-10 robust accuracy (\d\.\d+)", text)]
    assert len(rising) == 7 and rising[0] < 0.2 and rising[-1] > rising[0] + 0.3, rising
    pgd_acc = float(re.search(r"PGD-10 robust accuracy: (\d\.\d+)", text).group(1))
    aa_acc = float(re.search(r"AutoAttack robust accuracy: (\d\.\d+)", text).group(1))
    clean_acc = float(re.search(r"clean accuracy: (\d\.\d+)", text).group(1))
    assert clean_acc > 0.9 and 0.3 < aa_acc <= pgd_acc + 0.05, (clean_acc, pgd_acc, aa_acc)
    flat = float(re.search(r"average-case flatness \(lower = flatter\): (-?\d+\.\d+)", text).group(1))
    lam = float(re.search(r"top Hessian eigenvalue: (-?\d+\.\d+)", text).group(1))
    assert flat > 0 and lam > 0, (flat, lam)
    assert any("image/png" in o.get("data", {}) for o in outputs if o.get("output_type") == "display_data")
