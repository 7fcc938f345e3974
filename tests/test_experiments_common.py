"""The helpers every experiment shares: Pareto frontiers and comparing frontiers at equal latency."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexvlm_env.experiments.common import frontier_quality_at, pareto_frontier, quick_out_dir, run_header, write_json


def test_pareto_frontier_known_points():
    latency = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0]
    quality = [0.5, 0.2, 0.6, 0.4, 0.9, 0.6]
    # (2, 0.4) is dominated by (2, 0.6); (3, 0.5) by (2, 0.6); (4, 0.6) ties (2, 0.6) in quality but is slower.
    assert pareto_frontier(latency, quality).tolist() == [1, 2, 4]


def test_pareto_frontier_ties_keep_one_point():
    assert pareto_frontier([1.0, 1.0, 2.0], [0.5, 0.5, 0.5]).tolist() == [0]


def test_pareto_frontier_invariants_random():
    rng = np.random.default_rng(0)
    latency, quality = rng.uniform(1, 10, 200), rng.uniform(0, 1, 200)
    idx = pareto_frontier(latency, quality)
    assert np.all(np.diff(latency[idx]) > 0) and np.all(np.diff(quality[idx]) > 0)
    for i in range(200):  # every point is dominated by (or is) a frontier point
        assert np.any((latency[idx] <= latency[i]) & (quality[idx] >= quality[i]))


def test_frontier_quality_at_is_a_step_function():
    at = frontier_quality_at([3.0, 1.0, 2.0, 5.0], [0.5, 0.2, 0.6, 0.9], [0.5, 1.0, 2.5, 4.99, 5.0, 100.0])
    assert np.isnan(at[0])
    assert at[1:].tolist() == [0.2, 0.6, 0.6, 0.9, 0.9]


def test_pareto_frontier_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="latency_ms and quality"):
        pareto_frontier([1.0, 2.0], [0.5])


def test_run_header_and_write_json(tmp_path):
    header = run_header("e0", {"quick": True}, data_sources={"latency": "molmoe-1b-h100"})
    path = write_json(tmp_path / "x" / "e0_summary.json", {**header, "value": np.float32(0.5), "arr": np.arange(2)})
    loaded = json.loads(path.read_text())
    assert loaded["experiment"] == "e0" and loaded["args"] == {"quick": True} and loaded["value"] == 0.5
    assert loaded["arr"] == [0, 1] and "numpy" in loaded["versions"] and loaded["data_sources"]["latency"] == "molmoe-1b-h100"


def test_a_quick_run_with_the_default_folder_writes_under_quick(tmp_path):
    """--quick never overwrites the full run's results: the default folder becomes its quick/ subfolder; a folder given
    explicitly stays as given, and a full run keeps the default."""
    from dataclasses import dataclass
    from pathlib import Path

    @dataclass
    class Args:
        quick: bool = False
        out_dir: Path = tmp_path / "results"

    quick = Args(quick=True)
    quick_out_dir(quick)
    assert quick.out_dir == tmp_path / "results" / "quick"
    given = Args(quick=True, out_dir=tmp_path / "mine")
    quick_out_dir(given)
    assert given.out_dir == tmp_path / "mine"
    full = Args()
    quick_out_dir(full)
    assert full.out_dir == tmp_path / "results"


@pytest.mark.parametrize("script, argv, message", [
    ("m6_generalization.py", ["--families", "bogus"], "--families=('bogus',): unknown ['bogus']"),
    ("m3_overhead.py", ["--quick", "--n-observations", "0"], "--n-observations=0 must be >= 1"),
    ("e1_latency_decomposition.py", ["--preset", "big"], "--preset 'big' is not valid"),
])
def test_a_drivers_bad_argument_is_a_usage_error(script, argv, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / script), *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"{script}: error: {message}" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("experiment", ["m2", "m4", "e5"])
def test_plot_from_results_draws_into_the_folder_given_and_leaves_the_committed_figures(experiment, tmp_path):
    """The notebooks draw into a temporary folder: re-drawing a committed PNG rewrites its bytes."""
    import importlib
    from pathlib import Path

    from flexvlm_env.experiments import MODULES

    results = Path(__file__).resolve().parents[1] / "results"
    before = {p: p.stat().st_mtime_ns for p in (results / "figures").glob("*.png")}
    written = importlib.import_module(MODULES[experiment]).plot_from_results(results, tmp_path / "figs")
    assert written and all(Path(p).parent == tmp_path / "figs" and Path(p).stat().st_size > 0 for p in written)
    assert {p: p.stat().st_mtime_ns for p in (results / "figures").glob("*.png")} == before


def test_quick_runs_of_e1_m2_e3_write_nothing_over_the_committed_results():
    """E1's and M2's analysis step merges every raw file it finds and rewrites the summary, so with --quick it must move
    to results/quick/ as the raw file does; E3's summary, figures and estimators likewise."""
    from pathlib import Path

    from conftest import load_script

    results = Path(__file__).resolve().parents[1] / "results"
    for name in ("e1_latency_decomposition", "m2_repeatability"):
        script = load_script(name)
        args = script.Args(quick=True)
        script.output_dirs(args)
        assert args.out_dir == args.results == results / "quick", name
        full = script.Args()
        script.output_dirs(full)
        assert full.results == results
    e3 = load_script("e3_latency_estimator")
    args = e3.Args(quick=True)
    e3.quick_paths(args)
    assert {args.out.parent, args.figures.parent, args.estimators.parent} == {results / "quick"}
