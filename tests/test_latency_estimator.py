"""Stage-aware latency estimator (flexvlm_env.latency) and the E3 script's --quick mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flexvlm_env.latency import (
    FEATURES,
    METHODS,
    STAGES,
    LogLinearTotal,
    MLPTotal,
    StageLatencyEstimator,
    recalibrate,
)
from flexvlm_env.latency.estimator import decode_warmup, stage_features, workload

ROOT = Path(__file__).resolve().parents[1]

TRUE = {
    "preprocess": np.array([1.5, 0.1, 2.0]),
    "vision_encoder": np.array([1.0, 0.8]),
    "projector": np.array([0.02, 0.002]),
    "prefill": np.array([0.2, 0.25, 0.2, 0.05, 0.03, 0.01, 0.004, 0.008, 0.06]),
    "decode": np.array([0.1, 0.05, 0.004, 0.002, 0.3, 0.02, 0.003]),
}
TRUE_WARMUP_RATIO = 0.6  # one of WARMUP_RATIOS: the fit should pick it


def synthetic_table(coefficients: dict, n: int = 600, seed: int = 0, noise: float = 0.0, overhead: float = 0.1,
                    warmup_ratio: float = TRUE_WARMUP_RATIO) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "crops": rng.choice([1, 2, 3, 4, 6, 9, 12], n),
        "input_tokens": rng.integers(50, 1400, n),
        "top_k": rng.choice([1, 2, 4, 8], n),
        "active_blocks": rng.choice([8, 10, 12, 14, 16], n),
        "output_tokens": rng.integers(1, 64, n),
    })
    w = workload(*(frame[c] for c in ("crops", "input_tokens", "top_k", "active_blocks", "output_tokens")))
    total = np.full(n, overhead)
    for s in STAGES:
        y = stage_features(s, w, decode_warmup_ratio=warmup_ratio) @ coefficients[s] * (1 + noise * rng.standard_normal(n))
        frame[f"{s}_ms"] = y
        total = total + y
    frame["total_ms"] = total
    return frame


@pytest.fixture(scope="module")
def fitted() -> StageLatencyEstimator:
    return StageLatencyEstimator.fit(synthetic_table(TRUE))


def test_recovers_known_coefficients(fitted):
    for s in STAGES:
        np.testing.assert_allclose(fitted.coefficients[s], TRUE[s], rtol=1e-6, atol=1e-9, err_msg=s)
    assert fitted.overhead_ms == pytest.approx(0.1)
    assert fitted.decode_warmup_ratio == TRUE_WARMUP_RATIO
    # a hand-computed prediction: crops=2, n=500 (bucket 512), k=2, B=10, m=11
    pred = fitted.predict_stages(2, 500, 2, 10, 11)
    assert pred["vision_encoder"][0] == pytest.approx(1.0 + 0.8 * 2)
    big_n = 0.512
    experts_hit = 1 - (1 - 2 / 64) ** 512
    prefill = 0.2 + 10 * (0.25 + 0.2 * big_n + 0.05 * big_n**2 + 0.03 * 2 * big_n + 0.01 * 1 * big_n + 0.004 * 2 + 0.008 * 1
                          + 0.06 * experts_hit)
    assert pred["prefill"][0] == pytest.approx(prefill)
    s, sum_pos = 10, (10 * 500 + 10 * 9 / 2) / 1e3
    warm = sum(0.6**j for j in range(s))
    assert pred["decode"][0] == pytest.approx(0.1 * s + 0.05 * s * 10 + 0.004 * s * 10 * 2 + 0.002 * 10 * sum_pos
                                              + (0.3 + 0.02 * 10 + 0.003 * 10 * 2) * warm)


def test_noisy_fit_is_close(fitted):
    noisy = StageLatencyEstimator.fit(synthetic_table(TRUE, n=3000, seed=1, noise=0.02))
    test = synthetic_table(TRUE, n=500, seed=2)
    err = np.abs(noisy.predict_frame(test)["total_ms"] - test["total_ms"]) / test["total_ms"]
    assert err.mean() < 0.01


def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "est.json")
    loaded = StageLatencyEstimator.load(path)
    args = ([1, 4, 12], [300, 700, 1300], [1, 4, 8], [8, 12, 16], [1, 20, 60])
    np.testing.assert_array_equal(loaded.predict_total(*args), fitted.predict_total(*args))
    assert json.loads(path.read_text())["features"] == {s: list(FEATURES[s]) for s in STAGES}


def test_baselines_round_trip(tmp_path):
    table = synthetic_table(TRUE, n=300)
    ll = LogLinearTotal.fit(table)
    ll2 = LogLinearTotal.load(ll.save(tmp_path / "ll.json"))
    np.testing.assert_allclose(ll2.predict_frame(table), ll.predict_frame(table))
    mlp = MLPTotal(hidden=8).fit(table, steps=20)
    mlp2 = MLPTotal.load(mlp.save(tmp_path / "mlp.safetensors"))
    np.testing.assert_allclose(mlp2.predict_frame(table), mlp.predict_frame(table))


MONOTONE_TABLES = {
    # GPU stage table (forced 32-token answers: no warm-up term) and the CPU requests table (answers
    # of 2-8 tokens: the decode warm-up and experts-hit terms are fitted, with weighting="total")
    "molmoe-1b_h100_stages": (ROOT / "flexvlm_env" / "assets" / "profiles" / "molmoe-1b_h100_stages.parquet", {}),
    "micro_cpu_requests": (ROOT / "results" / "device_tables" / "micro112_cpu_requests.parquet",
                           {"prefill_bucket": 1, "weighting": "total"}),
}


@pytest.mark.parametrize("table_name", sorted(MONOTONE_TABLES))
@pytest.mark.parametrize("axis", ["crops", "input_tokens", "top_k", "active_blocks", "output_tokens"])
def test_monotone(axis, table_name):
    # on real tables too: the constrained fit never lets a growing input shrink the prediction
    from flexvlm_env.profiles.tables import read_parquet

    path, fit_kwargs = MONOTONE_TABLES[table_name]
    table, _ = read_parquet(path)
    est = StageLatencyEstimator.fit(table, **fit_kwargs)
    values = {"crops": [1, 2, 3, 4, 6, 9, 12], "input_tokens": [1, 20, 60, 300, 640, 1000, 1400, 2000],
              "top_k": [1, 2, 3, 4, 8], "active_blocks": list(range(1, 17)),
              "output_tokens": [0, 1, 2, 3, 4, 5, 7, 10, 100, 500]}
    base = {"crops": 4, "input_tokens": 640, "top_k": 2, "active_blocks": 12, "output_tokens": 20}
    xs = values[axis]
    inputs = {k: np.full(len(xs), v) for k, v in base.items()}
    inputs[axis] = np.asarray(xs)
    total = est.predict_total(**inputs)
    assert np.all(np.diff(total) >= -1e-12), (axis, total)
    stages = est.predict_stages(**inputs)
    for s in STAGES:
        assert np.all(np.diff(stages[s]) >= -1e-12), (axis, s, stages[s])
    for s in STAGES:
        constrained = [f != "1" for f in FEATURES[s]]
        assert np.all(est.coefficients[s][constrained] >= 0), (s, est.coefficients[s])


def test_decode_warmup_term():
    steps = np.arange(0, 40)
    for ratio in (0.0, 0.5, 0.9):
        warm = decode_warmup(steps, ratio)
        assert warm[0] == 0 and warm[1] == 1
        assert np.all(np.diff(warm) >= 0)
        assert warm[-1] <= 1 / (1 - ratio) + 1e-12  # the excess is bounded: it decays
    with pytest.raises(ValueError, match="decode_warmup_ratio"):
        decode_warmup(steps, 1.0)
    with pytest.raises(ValueError, match="decode_warmup_ratio"):
        StageLatencyEstimator({s: np.zeros(len(FEATURES[s])) for s in STAGES}, decode_warmup_ratio=-0.1)


def test_experts_hit_saturates():
    # the experts-hit feature: fraction of 64 experts touched, growing in tokens and k towards 1
    hit = [stage_features("prefill", workload(1, n, k, 1, 1), prefill_bucket=1)[0, -1]
           for k in (1, 8) for n in (1, 10, 100, 1000)]
    assert hit[0] == pytest.approx(1 / 64) and hit[4] == pytest.approx(8 / 64)
    assert np.all(np.diff(hit[:4]) > 0) and np.all(np.diff(hit[4:]) > 0)
    assert hit[3] == pytest.approx(1.0, abs=1e-6) and all(a <= b for a, b in zip(hit[:4], hit[4:]))


def test_warmup_left_out_with_one_output_length():
    # a stage table forces one answer length: W(s) is collinear with s there, so the fit keeps the
    # warm-up coefficients at 0 and recovers the per-step ones
    true = {**TRUE, "decode": np.array([0.1, 0.05, 0.004, 0.002, 0.0, 0.0, 0.0])}
    table = synthetic_table(true, warmup_ratio=0.0).assign(output_tokens=33)
    w = workload(*(table[c] for c in ("crops", "input_tokens", "top_k", "active_blocks", "output_tokens")))
    table["decode_ms"] = stage_features("decode", w) @ true["decode"]
    table["total_ms"] = sum(table[f"{s}_ms"] for s in STAGES) + 0.1
    est = StageLatencyEstimator.fit(table)
    assert est.decode_warmup_ratio == 0.0
    np.testing.assert_array_equal(est.coefficients["decode"][4:], 0.0)
    pred = est.predict_stages(2, 500, 2, 10, [2, 11, 100])["decode"]
    w = workload(2, 500, 2, 10, [2, 11, 100])
    np.testing.assert_allclose(pred, stage_features("decode", w) @ true["decode"], rtol=1e-6)


def test_total_weighting_recovers_known_coefficients():
    est = StageLatencyEstimator.fit(synthetic_table(TRUE), weighting="total")
    for s in STAGES:
        np.testing.assert_allclose(est.coefficients[s], TRUE[s], rtol=1e-6, atol=1e-9, err_msg=s)
    with pytest.raises(ValueError, match="weighting="):
        StageLatencyEstimator.fit(synthetic_table(TRUE), weighting="median")


def test_files_from_before_the_new_terms_load(fitted, tmp_path):
    # format-1 files written before the experts-hit and warm-up terms: 8 prefill and 4 decode
    # coefficients, no decode_warmup_ratio; they load with those terms at 0 and predict as before
    old = fitted.to_dict()
    old["features"] = {**old["features"], "prefill": old["features"]["prefill"][:8], "decode": old["features"]["decode"][:4]}
    old["coefficients"] = {**old["coefficients"], "prefill": TRUE["prefill"][:8].tolist(), "decode": TRUE["decode"][:4].tolist()}
    del old["decode_warmup_ratio"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = StageLatencyEstimator.load(path)
    assert loaded.decode_warmup_ratio == 0.0
    np.testing.assert_array_equal(loaded.coefficients["decode"][4:], 0.0)
    assert loaded.coefficients["prefill"][8] == 0.0
    pred = loaded.predict_stages(2, 500, 2, 10, 11)
    big_n = 0.512
    assert pred["prefill"][0] == pytest.approx(0.2 + 10 * (0.25 + 0.2 * big_n + 0.05 * big_n**2 + 0.03 * 2 * big_n
                                                              + 0.01 * 1 * big_n + 0.004 * 2 + 0.008 * 1))
    s, sum_pos = 10, (10 * 500 + 10 * 9 / 2) / 1e3
    assert pred["decode"][0] == pytest.approx(0.1 * s + 0.05 * s * 10 + 0.004 * s * 10 * 2 + 0.002 * 10 * sum_pos)
    # and the committed estimators load
    for saved in sorted((ROOT / "results" / "e3_estimators").glob("*.json")):
        assert StageLatencyEstimator.load(saved).predict_total(4, 500, 2, 12, 10)[0] > 0


def test_clear_errors(fitted, tmp_path):
    with pytest.raises(ValueError, match="crops must be >= 1"):
        fitted.predict_total(0, 100, 1, 8, 4)
    with pytest.raises(ValueError, match="non-finite"):
        fitted.predict_total(1, np.nan, 1, 8, 4)
    with pytest.raises(ValueError, match="output_tokens must be >= 0"):
        fitted.predict_total(1, 100, 1, 8, -1)
    with pytest.raises(ValueError, match="numeric"):
        fitted.predict_total("a", 100, 1, 8, 4)
    with pytest.raises(ValueError, match="do not broadcast"):
        fitted.predict_total([1, 2], [100, 200, 300], 1, 8, 4)
    with pytest.raises(ValueError, match="empty"):
        StageLatencyEstimator.fit(synthetic_table(TRUE).iloc[:0])
    with pytest.raises(ValueError, match="stage columns"):
        StageLatencyEstimator.fit(synthetic_table(TRUE).drop(columns=["prefill_ms"]))
    with pytest.raises(ValueError, match="lack stage"):
        StageLatencyEstimator({"decode": np.zeros(4)})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a stage latency estimator"):
        StageLatencyEstimator.load(bad)
    with pytest.raises(FileNotFoundError):
        StageLatencyEstimator.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="method="):
        recalibrate(fitted, synthetic_table(TRUE, n=20), "magic")


def test_recalibration_recovers_a_scaled_device(fitted):
    # a target device 30% slower in every stage: each method should get close with 25 samples
    scaled = {s: c * 1.3 for s, c in TRUE.items()}
    target = synthetic_table(scaled, n=200, seed=3, overhead=0.13)
    target = target.rename(columns={c: f"measured_{c}" for c in target.columns if c.endswith("_ms")})
    cal, test = target.iloc[:25], target.iloc[25:]
    source_err = None
    for method in METHODS:
        pred = recalibrate(fitted, cal, method, prefix="measured_").predict_frame(test)["total_ms"]
        err = float(np.mean(np.abs(pred - test["measured_total_ms"]) / test["measured_total_ms"]))
        if method == "source_only":
            source_err = err
            assert err > 0.2
        else:
            assert err < 0.02, (method, err)
    assert source_err is not None


def test_e3_quick_smoke(tmp_path):
    out = tmp_path / "e3.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "e3_latency_estimator.py"), "--quick", "--out", str(out),
         "--figures", str(tmp_path / "fig"), "--estimators", str(tmp_path / "est")],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["quick"] is True
    for key, entry in summary["same_device"].items():
        assert "@" in key
        assert {"mape_total", "p95_ape_total", "per_stage_mape"} <= set(entry)
        assert entry["mape_total"] > 0 and set(entry["per_stage_mape"]) <= set(STAGES)
    assert any("H100" in k for k in summary["same_device"])
    for key, curves in summary["recalibration"].items():
        assert "->" in key
        assert set(curves) == set(METHODS)
        assert set(curves["fine_tune"]) == {"10", "25", "50", "100"}
    assert all((ROOT / p).exists() for p in summary["figures"])  # absolute paths stay absolute under /
    assert all((ROOT / p).exists() for p in summary["estimators"].values())
    loaded = StageLatencyEstimator.load(ROOT / next(iter(summary["estimators"].values())))
    assert loaded.predict_total(4, 500, 2, 12, 10)[0] > 0
