"""E2 (knob coupling) and M1 (workloads): logic on known values, bad inputs, and the drivers' --quick runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flexvlm_env.config import KnobGrid
from flexvlm_env.experiments import knob_coupling as e2
from flexvlm_env.experiments import workloads as m1
from flexvlm_env.features import IMAGE_FEATURES, PROMPT_FEATURES
from flexvlm_env.profiles.loading import LATENCY_SOURCES
from flexvlm_env.profiles.replay import STAGE_COLUMNS, ReplayData
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- E2 logic


def test_frontier_gap_known_values():
    # A: (1 ms, 0.5), (3 ms, 0.9); B: (2 ms, 0.6), (4 ms, 0.7). Compared from 2 ms on:
    # at 2: 0.5-0.6=-0.1; at 3: 0.9-0.6=0.3; at 4: 0.9-0.7=0.2 -> max |gap| 0.3 at 3 ms.
    gap = e2.frontier_gap([1, 3], [0.5, 0.9], [2, 4], [0.6, 0.7])
    assert gap["max_abs_gap"] == pytest.approx(0.3)
    assert gap["signed_gap"] == pytest.approx(0.3)
    assert gap["at_latency_ms"] == 3
    assert gap["latency_range_ms"] == [2.0, 4.0]
    assert gap["mean_abs_gap"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    # identical sets: no gap
    assert e2.frontier_gap([1, 2], [0.1, 0.2], [1, 2], [0.1, 0.2])["max_abs_gap"] == 0
    with pytest.raises(ValueError, match="at least one point"):
        e2.frontier_gap([], [], [1], [0.1])


def _synthetic_table(grid: KnobGrid, interact: bool) -> pd.DataFrame:
    """Latency additive in the knobs; quality additive (no coupling) or with a crops x top_k term."""
    rows = []
    for j, c in enumerate(grid.configs()):
        lat = c.crops + 2 * c.top_k + c.active_blocks
        q = 0.01 * c.crops + 0.02 * c.top_k + 0.01 * c.active_blocks
        if interact and c.crops == 1 and c.top_k == 8:
            q += 0.2  # this combination is much better than the additive model says
        rows.append({"config_index": j, "crops": c.crops, "top_k": c.top_k, "active_blocks": c.active_blocks,
                     "quality": q, "latency_mean_ms": float(lat)})
    return pd.DataFrame(rows)


def test_coupling_structure_and_interaction():
    grid = KnobGrid(crops=(1, 2), top_k=(1, 8), active_blocks=(8, 16))
    plain = e2.coupling(_synthetic_table(grid, interact=False), "crops")
    assert plain["values"] == [1, 2]
    assert len(plain["pairs"]) == 1
    assert set(plain["frontiers"]) == {1, 2}
    coupled = e2.coupling(_synthetic_table(grid, interact=True), "crops")
    # the interaction lifts the crops=1 frontier by 0.2 at the latencies where (1, 8, *) are best
    assert coupled["best"]["max_abs_gap"] == pytest.approx(0.2 + plain["best"]["max_abs_gap"], abs=0.05)
    assert coupled["best"]["max_abs_gap"] > plain["best"]["max_abs_gap"] + 0.1
    with pytest.raises(ValueError, match="knob='width'"):
        e2.coupling(_synthetic_table(grid, False), "width")


def test_single_vs_multi_and_cross_workload():
    grid = KnobGrid(crops=(1, 2), top_k=(1, 8), active_blocks=(8, 16))
    table = _synthetic_table(grid, interact=True)
    table["workload"], table["latency_source"] = "a", "s"
    cases = e2.single_vs_multi(table, grid)
    assert cases, "some single-knob config has a multi-knob config at <= latency"
    for case in cases:
        assert case["multi"]["latency_ms"] <= case["single"]["latency_ms"] + 1e-9
        reduced = sum(case["multi"][k] < max(getattr(grid, k)) for k in e2.KNOBS)
        assert reduced >= 2
    assert cases[0]["gain"] == max(c["gain"] for c in cases)
    # one single-knob config per knob on a 2-value grid
    assert e2.single_knob_mask(table, grid).sum() == 3
    other = _synthetic_table(grid, interact=False)
    other["workload"], other["latency_source"] = "b", "s"
    for t in (table, other):
        t["on_frontier"] = False
        t.loc[e2.pareto_frontier(t["latency_mean_ms"], t["quality"]), "on_frontier"] = True
    cross = e2.cross_workload_cases(table, other)
    assert all(c["shortfall"] >= 0 for c in cross)
    assert {c["on_frontier_of"] for c in cross} <= {"a", "b"}


def _replay(n_per_family: int = 6, seed: int = 0) -> ReplayData:
    rng = np.random.default_rng(seed)
    grid = KnobGrid(crops=(1, 4, 12), top_k=(1, 8), active_blocks=(8, 16))
    families = ["coco_2014_vqa"] * n_per_family + ["coco_caption"] * n_per_family
    R, C = len(families), len(grid)
    stage = np.zeros((R, C, len(STAGE_COLUMNS)), np.float32)
    for j, c in enumerate(grid.configs()):
        stage[:, j, 0] = 1.0                                   # preprocess: constant
        stage[:, j, 1] = 0.3 * c.crops                         # vision encoder: crops
        stage[:, j, 3] = 0.1 * c.crops * c.active_blocks / 16  # prefill: crops x depth
        decode = np.where(np.array(families) == "coco_caption", 10.0, 1.0)
        stage[:, j, 4] = decode * (c.active_blocks / 16) * (0.5 + 0.5 * c.top_k / 8)
    quality = rng.uniform(0, 1, (R, C)).astype(np.float32)
    return ReplayData(grid=grid, request_ids=tuple(f"{f}/procedural/val/{i}" for i, f in enumerate(families)), families=tuple(families),
                      prompt_features=np.zeros((R, len(PROMPT_FEATURES)), np.float32),
                      image_features=np.zeros((R, len(IMAGE_FEATURES)), np.float32),
                      quality=quality, answers=np.full((R, C), "a", dtype=object), output_tokens=np.ones((R, C), np.int32),
                      stage_ms=stage, total_ms=stage.sum(axis=2), noise_log_ratio=np.zeros((C, 1), np.float32))


def test_config_stats_and_bootstrap():
    data = _replay()
    table = e2.config_stats(data, "coco_caption", "synthetic")
    assert len(table) == len(data.grid)
    rows = np.asarray(data.families) == "coco_caption"
    np.testing.assert_allclose(table["quality"], data.quality[rows].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(table["latency_mean_ms"], data.total_ms[rows].mean(axis=0), rtol=1e-6)
    assert (table["latency_p99_ms"] >= table["latency_p95_ms"] - 1e-9).all()
    assert table["on_frontier"].any()
    with pytest.raises(ValueError, match="family='okvqa'"):
        e2.config_stats(data, "okvqa", "synthetic")
    q, t = data.quality[rows], data.total_ms[rows].astype(float)
    boot = e2.bootstrap_gap(q, t, data.grid, "crops", 1, 12, float(t.max()), n_boot=30)
    assert boot["ci95"][0] <= boot["median"] <= boot["ci95"][1]
    with pytest.raises(ValueError, match="n_boot=0"):
        e2.bootstrap_gap(q, t, data.grid, "crops", 1, 12, 1.0, n_boot=0)
    select = np.arange(rows.sum()) % 2 == 0
    check = e2.split_half_check(q, t, data.grid, "crops", select)
    assert check["n_select"] == check["n_heldout"] == 3
    with pytest.raises(ValueError, match="both sides"):
        e2.split_half_check(q, t, data.grid, "crops", np.ones(rows.sum(), bool))


def test_select_requests_and_load_pool_errors():
    answers = pd.DataFrame({"request_id": [f"coco_caption/procedural/val/{i}" for i in range(5)], "family": "coco_caption"})
    assert len(e2.select_requests(answers, ["coco_caption"], 3)) == 3
    with pytest.raises(ValueError, match="not in the quality table"):
        e2.select_requests(answers, ["okvqa"], None)
    with pytest.raises(ValueError, match="per_family=0"):
        e2.select_requests(answers, ["coco_caption"], 0)
    with pytest.raises(ValueError, match="latency='cpu'"):
        e2.load_pool("x.parquet", "y.parquet", latency="cpu")


# ----------------------------------------------------------------------------- M1 logic


def test_knob_sensitivity_known_values():
    data = _replay()
    sens = m1.knob_sensitivity(data, "coco_caption", "synthetic")
    total = sens[sens["stage"] == "total"].set_index("knob")
    # full config (12, 8, 16): 1 + 3.6 + 1.2 + 10 = 15.8 ms for captioning
    assert total.loc["crops", "full_ms"] == pytest.approx(15.8, rel=1e-5)
    # crops 12 -> 1: vision 3.6 -> 0.3, prefill 1.2 -> 0.1: 15.8 -> 11.4
    assert total.loc["crops", "ratio"] == pytest.approx(11.4 / 15.8, rel=1e-5)
    assert total.loc["crops", "elasticity"] == pytest.approx(np.log(11.4 / 15.8) / np.log(1 / 12), rel=1e-5)
    # blocks 16 -> 8: prefill 1.2 -> 0.6, decode 10 -> 5: saving 5.6 / 15.8
    assert total.loc["active_blocks", "saving"] == pytest.approx(5.6 / 15.8, rel=1e-5)
    # stage shares of the saving add up to the total saving
    for knob in e2.KNOBS:
        stages = sens[(sens["knob"] == knob) & (sens["stage"] != "total")]["saving_share_of_total"].sum()
        assert stages == pytest.approx(total.loc[knob, "saving"], abs=1e-6)
    both = pd.concat([m1.knob_sensitivity(data, f, "synthetic") for f in ("coco_2014_vqa", "coco_caption")])
    verdict = m1.expectation(both, "coco_2014_vqa", "coco_caption")
    assert verdict["qa_prefill_sensitive"]  # QA: decode tiny, crops dominate
    assert verdict["captioning_depth_beats_crops"]  # captioning: 10 ms decode halves with depth
    assert verdict["relative_crops_matter_more_for_qa"]
    breakdown = m1.stage_breakdown(data, "coco_caption")
    assert sum(breakdown["full_config"]["stage_share"].values()) == pytest.approx(1.0)
    assert breakdown["full_config"]["decode_share"] == pytest.approx(10 / 15.8, rel=1e-5)
    with pytest.raises(ValueError, match="family='mmmu'"):
        m1.stage_breakdown(data, "mmmu")


# ----------------------------------------------------------------------------- drivers


def test_e2_driver_quick(tmp_path):
    e2_driver = load_script("e2_knob_coupling")
    summary = e2_driver.main(e2_driver.Args(quick=True, out_dir=tmp_path))
    on_disk = json.loads((tmp_path / "e2_summary.json").read_text())
    assert on_disk["experiment"] == "e2" and set(on_disk["data_sources"]) == {"molmoe-1b-h100", "micro-h200-measured"}
    h = summary["headline"]
    assert h["bar_met"] == (h["largest_gap_points"] >= h["bar_points"])
    assert h["largest_gap_points"] == max(h["gap_points_by_case"].values()) or np.isclose(h["largest_gap_points"], max(h["gap_points_by_case"].values()), atol=0.01)
    assert len(summary["analysis"]["best_cases"]) == 2 * 2 * 3
    configs = pd.read_parquet(tmp_path / "e2_configs.parquet")
    assert len(configs) == 2 * 2 * 140 and (configs["n_requests"] == 40).all()
    assert configs["quality"].between(0, 1).all() and (configs["latency_mean_ms"] > 0).all()
    assert on_disk["data_sources"]["micro-h200-measured"]["n_measured_requests"] == 80
    figures = sorted(p.name for p in (tmp_path / "figures").glob("e2_*.png"))
    assert "e2_scatter_frontier.png" in figures and "e2_cases.png" in figures and len(figures) == 5
    with pytest.raises(SystemExit, match="--latency"):
        e2_driver.main(e2_driver.Args(quick=True, latency=("gpu",), out_dir=tmp_path))
    # Every shipped latency source can be E2's (here the current engine's MolmoE-1B H200 table).
    assert set(e2.LATENCY_CHOICES) == set(LATENCY_SOURCES)
    h200 = e2_driver.main(e2_driver.Args(quick=True, latency=("molmoe-1b-h200",), n_boot=2, out_dir=tmp_path / "h200"))
    assert set(h200["data_sources"]) == {"molmoe-1b-h200"}
    assert h200["data_sources"]["molmoe-1b-h200"]["stage_table_device"] == "NVIDIA H200"
    with pytest.raises(SystemExit, match="--families"):
        e2_driver.main(e2_driver.Args(quick=True, families=("coco_caption",), out_dir=tmp_path))
    with pytest.raises(SystemExit, match="--quality-table"):
        e2_driver.main(e2_driver.Args(quick=True, quality_table=tmp_path / "missing.parquet", out_dir=tmp_path))


def test_m1_driver_quick(tmp_path):
    m1_driver = load_script("m1_workloads")
    summary = m1_driver.main(m1_driver.Args(quick=True, out_dir=tmp_path))
    assert summary["experiment"] == "m1"
    for verdict in summary["headline"]["expectation"].values():
        assert set(verdict["saving_qa"]) == set(e2.KNOBS)
        assert all(-1 < v < 1 for v in verdict["saving_qa"].values())
    for b in summary["stage_breakdown"].values():
        assert sum(b["full_config"]["stage_share"].values()) == pytest.approx(1.0, abs=1e-6)
    sens = pd.read_parquet(tmp_path / "m1_sensitivity.parquet")
    assert set(sens["scope"]) == {"pool", "nine_families"}
    assert sens[sens["scope"] == "nine_families"]["family"].nunique() == 9
    requests = pd.read_parquet(tmp_path / "m1_requests.parquet")
    assert len(requests) == 2 * 3 * 40  # two workloads x three latency sources
    assert len(sorted((tmp_path / "figures").glob("m1_*.png"))) == 5
    with pytest.raises(SystemExit, match="--per-family"):
        m1_driver.main(m1_driver.Args(quick=True, per_family=1, out_dir=tmp_path))
