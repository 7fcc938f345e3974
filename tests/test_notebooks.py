"""The committed analysis notebooks (notebooks/*.ipynb) against scripts/build_notebooks.py, which
writes and executes them: the same cells, every code cell run, none ending in an error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("nbformat")  # in the test extra; a bare GPU machine running `-m gpu` may lack it
build = load_script("build_notebooks")


@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_committed_notebook_has_the_cells_the_script_writes_and_ran_cleanly(name):
    committed = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    expected = build.notebook(*build.NOTEBOOKS[name])
    # a change to a notebook's text in the script without a rebuild shows here
    assert [(c["cell_type"], "".join(c["source"])) for c in committed["cells"]] == \
        [(c.cell_type, c.source) for c in expected.cells]
    code = [c for c in committed["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))  # run once, in order
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, [f"{e['ename']}: {e['evalue']}" for e in errors]
    # every experiment section shows its figure (an image output)
    assert all(any("image/png" in o.get("data", {}) for o in c["outputs"]) for c in code[2::2])


def test_every_notebook_is_committed():
    assert {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")} == set(build.NOTEBOOKS)
