"""M4 budget guardrail (issue 8): estimator-based candidate filtering and the study script."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexvlm_env.latency import StageLatencyEstimator
from flexvlm_env.latency.guardrail import (
    budget_mask,
    filter_by_budget,
    predict_replay_latency,
    predicted_output_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
ESTIMATOR = ROOT / "results" / "e3_estimators" / "molmoe-1b_h100.json"


def test_filter_known_values():
    cands = ["a", "b", "c", "d"]
    pred = [10.0, 20.0, 30.0, 40.0]
    assert filter_by_budget(cands, pred, 25.0) == ["a", "b"]
    assert filter_by_budget(cands, pred, 30.0) == ["a", "b", "c"]  # equality passes
    assert filter_by_budget(cands, pred, 30.0, margin=1.2) == ["a", "b"]  # 30 x 1.2 = 36 > 30; 20 x 1.2 = 24
    assert filter_by_budget(cands, pred, 30.0, margin=0.75) == cands  # 40 x 0.75 = 30
    assert filter_by_budget([3, 1, 2], [5.0, 1.0, 9.0], 6.0) == [3, 1]  # input order kept


def test_filter_never_empty_falls_back_to_fastest():
    assert filter_by_budget(["a", "b", "c"], [30.0, 10.0, 20.0], 5.0) == ["b"]
    assert filter_by_budget(["a", "b"], [10.0, 10.0], 1.0) == ["a"]  # first on ties
    mask = budget_mask(np.array([[30.0, 10.0, 20.0], [1.0, 2.0, 3.0]]), np.array([5.0, 2.5]), 1.0)
    assert mask.tolist() == [[False, True, False], [True, True, False]]


@pytest.mark.parametrize("kwargs, match", [
    ({"candidates": [], "predicted_ms": [], "budget_ms": 1.0}, "at least one candidate"),
    ({"candidates": [1, 2], "predicted_ms": [1.0], "budget_ms": 1.0}, "2 candidates but 1"),
    ({"candidates": [1], "predicted_ms": [np.nan], "budget_ms": 1.0}, "finite"),
    ({"candidates": [1], "predicted_ms": [-1.0], "budget_ms": 1.0}, ">= 0"),
    ({"candidates": [1], "predicted_ms": ["x"], "budget_ms": 1.0}, "numeric"),
    ({"candidates": [1], "predicted_ms": [1.0], "budget_ms": 0.0}, "budget_ms"),
    ({"candidates": [1], "predicted_ms": [1.0], "budget_ms": np.inf}, "budget_ms"),
    ({"candidates": [1], "predicted_ms": [1.0], "budget_ms": "a"}, "budget_ms"),
    ({"candidates": [1], "predicted_ms": [1.0], "budget_ms": 1.0, "margin": 0.0}, "margin"),
    ({"candidates": [1], "predicted_ms": [1.0], "budget_ms": 1.0, "margin": -1.0}, "margin"),
    ({"candidates": [1], "predicted_ms": [1.0], "budget_ms": 1.0, "margin": np.nan}, "margin"),
])
def test_filter_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        filter_by_budget(**kwargs)


def test_budget_mask_errors():
    with pytest.raises(ValueError):
        budget_mask(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError):
        budget_mask(np.ones((2, 0)), np.ones(2))
    with pytest.raises(ValueError):
        budget_mask(np.ones((2, 3)), np.zeros(2))


def test_filter_monotone_in_margin():
    rng = np.random.default_rng(0)
    pred = rng.uniform(1, 100, size=50)
    sizes = [len(filter_by_budget(range(50), pred, 40.0, m)) for m in np.linspace(0.5, 2.0, 16)]
    assert all(a >= b for a, b in itertools.pairwise(sizes))
    assert sizes[-1] >= 1
    masks = [budget_mask(pred[None], np.array([40.0]), m)[0] for m in (0.8, 1.0, 1.3)]
    assert np.all(masks[1] <= masks[0]) and np.all(masks[2] <= masks[1])  # a tighter margin keeps a subset


def test_predict_replay_latency_close_to_recorded():
    from flexvlm_env.profiles import load_replay_data
    from flexvlm_env.profiles.replay import request_split_mask

    data = load_replay_data()
    est = StageLatencyEstimator.load(ESTIMATOR)
    out = predicted_output_tokens(data)
    assert out.shape == data.total_ms.shape
    # the same family/config gets the same predicted length (no per-request leak)
    fam = np.asarray(data.families) == data.families[0]
    assert np.all(out[fam] == out[fam][0])
    train = request_split_mask(data.request_ids, data.families, "train")
    np.testing.assert_allclose(out[fam][0], np.median(data.output_tokens[fam & train], axis=0))
    pred = predict_replay_latency(data, est)
    assert pred.shape == data.total_ms.shape and np.all(pred > 0)
    assert np.median(np.abs(pred / data.total_ms - 1)) < 0.05
    with pytest.raises(ValueError, match="shape"):
        predict_replay_latency(data, est, output_tokens=np.ones((2, 2)))


def test_latency_guardrail_from_estimator():
    from agents.guardrail import LatencyGuardrail
    from flexvlm_env.envs.core import FAMILY_NAMES
    from flexvlm_env.profiles import load_replay_data

    data = load_replay_data()
    guard = LatencyGuardrail.from_estimator(data, StageLatencyEstimator.load(ESTIMATOR), quantile=0.5)
    assert guard.predicted_fraction.shape == (len(FAMILY_NAMES), len(data.grid))
    assert np.all(np.isfinite(guard.predicted_fraction))
    mask = guard.mask(data.families[0], 0.35)
    assert mask.any() and not mask.all()
    assert guard.mask(data.families[0], 10.0).all()


def test_m4_script_quick(tmp_path):
    out, fig = tmp_path / "m4.json", tmp_path / "m4.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "m4_guardrail.py"), "--quick", "--out", str(out), "--figure", str(fig)],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert fig.exists() and fig.stat().st_size > 0
    assert summary["quick"] is True and summary["split"] == "heldout"
    assert set(summary["by_fraction"]) == {"0.35", "0.5", "0.7", "0.85", "1"}
    for entry in summary["by_fraction"].values():
        assert set(entry) == {"none", "oracle", "estimator", "noisy"}
        for metrics in entry.values():
            assert 0 <= metrics["violation_rate"] <= 1 and 0 <= metrics["quality_retention"] <= 1.5
    mean = summary["mean_over_fractions"]
    assert mean["oracle"]["violation_rate"] < mean["none"]["violation_rate"]
    assert mean["estimator"]["violation_rate"] < mean["none"]["violation_rate"]
    for points in summary["margin_sweep"].values():
        fa = [p["false_accept_rate"] for p in points]
        fr = [p["false_reject_rate"] for p in points]
        assert fa == sorted(fa, reverse=True) and fr == sorted(fr)  # margin up: fewer accepts, more rejects
