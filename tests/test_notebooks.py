"""Every notebook in notebooks/ runs headless without an error and shows at least one picture.

They are executed (copies: the committed files are left alone) with the shipped model,
weights/shapes-tiny, or the folder in $MINIBLIP2_WEIGHTS, exactly as scripts/run_notebooks.py
executes them to refresh the committed outputs.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "scripts"))
pytest.importorskip("nbclient", reason="the notebook runner needs the test extra: pip install -e '.[test]'")
from run_notebooks import execute  # noqa: E402

HAVE_WEIGHTS = (ROOT / "weights" / "shapes-tiny" / "config.json").is_file() or os.environ.get("MINIBLIP2_WEIGHTS")


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05"]


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="the shipped model weights/shapes-tiny is not in this checkout")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_a_picture(path):
    notebook = execute(path)  # raises CellExecutionError with the failing cell and its traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no picture"
