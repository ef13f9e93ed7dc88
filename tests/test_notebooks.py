"""The example notebooks run, cell by cell, on a real Jupyter kernel (ipykernel, through nbclient): a cell that
raises fails the test. They are kept in git without outputs."""

import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
NOTEBOOKS = ["quickstart.ipynb", "evaluate.ipynb"]


def _read(name):
    return nbformat.read(os.path.join(EXAMPLES, name), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def _execute(nb, tmp_path):
    """Runs every cell on the python3 kernel of this interpreter, in examples/; figures come back as PNG (the
    kernel's inline backend)."""
    from jupyter_client.kernelspec import KernelSpecManager

    # The venv's python3 kernelspec (ipykernel's, or the one it installs under sys.prefix); jupyter_client
    # starts it with sys.executable, this interpreter: no `ipykernel install --user` needed.
    assert KernelSpecManager().get_kernel_spec("python3")
    check = nbformat.v4.new_code_cell(
        f"import sys, os\nassert os.path.realpath(sys.executable) == "
        f"{os.path.realpath(sys.executable)!r}, sys.executable"
    )
    nb.cells.insert(0, check)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": EXAMPLES}})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MPLBACKEND", raising=False)
        mp.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "xla"))  # the kernel's compilation cache
        client.execute()
    return nb


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_runs(tmp_path):
    nb = _execute(_read("quickstart.ipynb"), tmp_path)
    text = _text(nb)
    assert "hidden states (3, " in text and "perplexity" in text and "loss " in text
    # The mask and attention; the loss curve, drawn after training: the trainer must leave the kernel's inline
    # backend alone (no matplotlib.use in the library).
    assert _images(nb) == 2, "a figure did not show: did something switch matplotlib's backend?"


def test_evaluate_runs(tmp_path):
    pytest.importorskip("lm_eval")
    nb = _execute(_read("evaluate.ipynb"), tmp_path)
    text = _text(nb)
    assert "mj_local_mc" in text and "acc" in text and "exact_match" in text
