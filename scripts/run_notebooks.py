"""Execute the notebooks in notebooks/ in place, so that the committed files hold their outputs.

    python scripts/run_notebooks.py                      # all of them, with the shipped model
    python scripts/run_notebooks.py notebooks/03_qformer.ipynb

Each runs headless in a fresh python3 kernel from the notebooks/ folder, as a reader would run
it; a cell that fails stops that notebook with its traceback. Prints the time each one took.
Needs the `notebooks` or `test` extra (nbclient, ipykernel, matplotlib).
"""

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell of one notebook in a new kernel; returns the notebook with its outputs."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # the python3 kernel starts `python` from PATH: make it this interpreter (a venv's, in CI)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            coalesce_streams=True, resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return notebook


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(NOTEBOOKS.glob("*.ipynb"))
    total = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        nbformat.write(execute(path), path)
        print(f"{path.name:<32} {time.perf_counter() - start:6.1f} s", flush=True)
    print(f"{'all':<32} {time.perf_counter() - total:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
