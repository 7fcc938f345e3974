"""`scripts/make_figures.py` rebuilds every committed experiment figure from the data alone."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from flexvlm_env.experiments import MODULES

ROOT = Path(__file__).resolve().parents[1]


def test_make_figures_rebuilds_every_experiment_figure_from_data(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results, ignore=shutil.ignore_patterns("figures"))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_figures.py"), "--results", str(results)],
                   check=True, capture_output=True)
    committed = {p.name for p in (ROOT / "results" / "figures").glob("*.png") if p.name.split("_")[0] in MODULES}
    rebuilt = {p.name for p in (results / "figures").glob("*.png")}
    assert committed and committed <= rebuilt, sorted(committed - rebuilt)
    assert {name.split("_")[0] for name in committed} == set(MODULES)


def usage_error(*argv: str) -> str:
    """stderr of make_figures.py refused as a usage error: exit status 2, one line, no traceback."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_figures.py"), *argv], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("make_figures.py: error: ") and out.stderr.count("\n") == 1, out.stderr
    return out.stderr


def test_make_figures_rejects_unknown_ids(tmp_path):
    assert "--only ['e9']: unknown experiment ids; allowed: ['e1'," in usage_error("--only", "e9")


def test_make_figures_refuses_a_named_experiment_without_data(tmp_path):
    assert "no e1_summary.json in" in usage_error("--results", str(tmp_path), "--only", "e1")
    assert "is not a directory" in usage_error("--results", str(tmp_path / "no"))
    assert not (tmp_path / "figures").exists()  # refused before drawing anything
