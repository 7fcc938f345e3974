"""E6 (ablations), M5 (mask policy) and M6 (generalization): logic with known values, bad
arguments, and each driver's --quick run writing into a temporary folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import FAMILY_NAMES
from flexvlm_env.experiments import ablations, generalization, mask_policy
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profiles():
    from agents.profiles import ProfileTables

    return ProfileTables.load(split="train")


# ---------------------------------------------------------------------------- E6 logic

def test_allowed_configs_counts():
    grid = KnobGrid()
    assert ablations.allowed_configs(grid, ()).sum() == 1  # only the full configuration
    assert ablations.allowed_configs(grid, ("crops",)).sum() == 7
    assert ablations.allowed_configs(grid, ("top_k",)).sum() == 4
    assert ablations.allowed_configs(grid, ("active_blocks",)).sum() == 5
    assert ablations.allowed_configs(grid, ("crops", "top_k")).sum() == 28
    assert ablations.allowed_configs(grid, ablations.KNOBS).all()
    full = ablations.allowed_configs(grid, ("top_k",))
    assert all(c.crops == 12 and c.active_blocks == 16 for c, ok in zip(grid.configs(), full) if ok)


def test_allowed_configs_rejects_unknown_knob():
    with pytest.raises(ValueError, match="unknown.*depth"):
        ablations.allowed_configs(KnobGrid(), ("depth",))


def test_restricted_lut_only_picks_allowed_configs(profiles):
    from agents.lut import LUTController

    allowed = ablations.allowed_configs(profiles.grid, ("active_blocks",))
    lut = LUTController.fit(ablations.restrict(profiles, allowed))
    assert allowed[lut.table].all()
    with pytest.raises(ValueError, match="non-empty bool mask"):
        ablations.restrict(profiles, np.zeros(len(profiles.grid), bool))


def test_family_blind_controller_ignores_family(profiles):
    from agents.lut import LUTController

    blind = ablations.blind_controller(LUTController.fit(ablations.family_blind(profiles)))
    obs = profiles.observations(0.5)
    shuffled = dict(obs, family=np.roll(obs["family"], 7))
    assert np.array_equal(blind.select_indices(obs), blind.select_indices(shuffled))


def test_gains_known_values():
    r = {"a": {"mean": {"quality_retention": 0.9, "violation_rate": 0.01}, "by_fraction": {"0.5": {"quality_retention": 0.8, "violation_rate": 0.0}}},
         "b": {"mean": {"quality_retention": 0.7, "violation_rate": 0.11}, "by_fraction": {"0.5": {"quality_retention": 0.6, "violation_rate": 0.5}}}}
    g = ablations.gains(r, "a", ["b"], ["0.5"])
    assert g["b"]["mean"]["quality_retention"] == pytest.approx(0.2)
    assert g["b"]["mean"]["violation_rate"] == pytest.approx(-0.1)
    assert g["b"]["0.5"]["violation_rate"] == pytest.approx(-0.5)


def test_recalibrated_predictor_predicts_totals_like_its_frames():
    """The recalibrated predictor E6 hands to `predict_replay_latency` gives the same totals
    through `predict_total` as through `predict_frame`, and differs from the source."""
    source = ablations.source_estimator(ROOT / "flexvlm_env/assets/profiles/molmoe-1b_h100_stages.parquet")
    data = ablations.h200_replay_data(ROOT / "results/device_tables/molmoe-1b_h200_stages.parquet")
    predictor = ablations.recalibrated_predictor(source, ablations.replay_calibration_points(data, 25, 0))
    args = (4, np.array([300.0, 700.0]), 2, 12, np.array([8.0, 40.0]))
    frame = pd.DataFrame({"crops": [4, 4], "input_tokens": args[1], "top_k": [2, 2], "active_blocks": [12, 12],
                          "output_tokens": args[4]})
    assert np.allclose(predictor.predict_total(*args), predictor.predict_frame(frame)["total_ms"].to_numpy())
    assert not np.allclose(predictor.predict_total(*args), source.predict_total(*args))
    assert predictor.metadata == source.metadata


# ---------------------------------------------------------------------------- M5 logic

def m5_frame():
    rows = []
    for policy, bonus in (("importance", 0.2), ("prefix", 0.0), ("random0", 0.1), ("random1", 0.1)):
        for r in ("r0", "r1", "r2"):
            for b in (8, 16):
                q = 0.5 + (bonus if b < 16 else 0.0) + (0.05 if r == "r0" else 0.0)
                rows.append({"request_id": r, "crops": 1, "top_k": 8, "active_blocks": b, "family": "okvqa",
                             "quality": q, "output_tokens": 3, "policy": policy})
    return pd.DataFrame(rows)


def test_paired_gap_known_values():
    frame = m5_frame()
    prefix = mask_policy.paired_gap(frame, "importance", ["prefix"])
    assert prefix["8"]["gap"] == pytest.approx(0.2)
    assert prefix["8"]["ci95_low"] == pytest.approx(0.2)  # identical per-request differences: no spread
    assert prefix["16"]["gap"] == pytest.approx(0.0)
    assert prefix["8"]["share_of_requests_better"] == 1.0
    assert mask_policy.paired_gap(frame, "importance", ["random0", "random1"])["8"]["gap"] == pytest.approx(0.1)
    by_blocks = mask_policy.quality_by_blocks(frame)
    assert by_blocks["prefix"]["8"] == pytest.approx(0.5 + 0.05 / 3)


def test_latency_summary_max_rel_diff():
    records = [{"policy": p, "active_blocks": 8, "request_id": "r", "round": i, "plan": [0, 1], "total_ms": t,
                "prefill_ms": 1.0, "decode_ms": 1.0, "vision_encoder_ms": 1.0}
               for i in range(3) for p, t in (("importance", 10.0), ("prefix", 11.0))]
    summary = mask_policy.latency_summary(records)
    assert summary["8"]["max_rel_diff_median"] == pytest.approx(0.1)
    assert summary["8"]["max_rel_diff_paired"] == pytest.approx(11.0 / 10.5 - 1)


def test_load_quality_tables_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="micro_quality_val_mask_prefix.parquet"):
        mask_policy.load_quality_tables(ROOT / "flexvlm_env/assets/profiles/micro_quality_val.parquet", tmp_path)


def test_mask_policy_quality_replaces_sub_grid_only():
    from flexvlm_env.config import Config
    from flexvlm_env.profiles import load_replay_data

    data = load_replay_data()
    frame = pd.DataFrame([{"request_id": data.request_ids[0], "crops": 1, "top_k": 8, "active_blocks": 8, "quality": 0.25, "policy": "prefix"}])
    quality, sub = ablations.mask_policy_quality(data, frame, "prefix")
    j = data.config_index(Config(1, 8, 8))
    assert sub.sum() == 1 and sub[j]
    assert quality[0, j] == pytest.approx(0.25)
    assert np.array_equal(np.delete(quality, j, axis=1), np.delete(data.quality, j, axis=1))


# ---------------------------------------------------------------------------- M6 logic

def test_without_family_and_calibration(profiles):
    train = generalization.without_family(profiles, "doc_qa")
    assert FAMILY_NAMES.index("doc_qa") not in set(train.family_index.tolist())
    cal = generalization.calibration_profiles(profiles, "doc_qa", 10, seed=0)
    assert cal.n_requests == 10 and set(cal.family_index.tolist()) == {FAMILY_NAMES.index("doc_qa")}
    assert np.allclose(cal.reference_ms, np.median(cal.latency_ms[:, -1]))
    with pytest.raises(ValueError, match="n=0"):
        generalization.calibration_profiles(profiles, "doc_qa", 0, seed=0)


def test_recalibrated_guardrail_row(profiles):
    index = FAMILY_NAMES.index("doc_qa")
    train = generalization.without_family(profiles, "doc_qa")
    base = train.family_latency_fraction(0.95)
    assert np.isnan(base[index]).all()
    unseen = generalization.recalibrated_guardrail(base, None, index, 0.95)
    assert np.allclose(unseen.predicted_fraction[index], np.nanmax(base, axis=0))  # the conservative fallback
    cal = generalization.calibration_profiles(profiles, "doc_qa", 25, seed=1)
    recal = generalization.recalibrated_guardrail(base, cal, index, 0.95)
    assert np.allclose(recal.predicted_fraction[index], cal.family_latency_fraction(0.95)[index])
    others = [i for i in range(len(FAMILY_NAMES)) if i != index]
    assert np.allclose(recal.predicted_fraction[others], base[others])


def test_nearest_family_of_a_seen_family_is_itself(profiles):
    # a seen family's own full profile is at distance 0 from itself
    index = FAMILY_NAMES.index("okvqa")
    rows = generalization.family_rows(profiles, "okvqa")
    assert generalization.nearest_family(profiles, profiles.subset(rows), index, 0.95) == index


# ---------------------------------------------------------------------------- drivers

def test_driver_argument_errors(tmp_path):
    m5d, m6d, e6d = load_script("m5_mask_policy"), load_script("m6_generalization"), load_script("e6_ablations")
    with pytest.raises(ValueError, match="--device='tpu'"):
        m5d.validate(m5d.Args(device="tpu"))
    with pytest.raises(ValueError, match="--policies"):
        m5d.validate(m5d.Args(policies=("prefix", "random0")))
    with pytest.raises(ValueError, match="--families.*unknown \\['vqa'\\]"):
        m6d.validate(m6d.Args(families=("vqa",)))
    with pytest.raises(ValueError, match="--ns"):
        m6d.validate(m6d.Args(ns=(0, 500)))
    with pytest.raises(ValueError, match="--recal-n=1"):
        e6d.validate(e6d.Args(recal_n=1))
    with pytest.raises(ValueError, match="--h200-stages"):
        e6d.validate(e6d.Args(h200_stages=tmp_path / "missing.parquet"))


def test_m5_quick(tmp_path):
    m5d = load_script("m5_mask_policy")
    m5d.main(m5d.Args(quick=True, out_dir=tmp_path))
    s = json.loads((tmp_path / "m5_summary.json").read_text())
    assert s["experiment"] == "m5"
    assert set(s["quality_by_blocks"]) == set(mask_policy.POLICIES)
    for gaps in s["gaps"].values():
        assert set(gaps) == {"8", "12", "16"}
        assert gaps["16"]["gap"] == pytest.approx(0.0)  # all 16 blocks run: no policy difference
    assert s["latency_max_rel_diff_across_policies"]["latency_cpu"]["paired"] >= 0
    assert (tmp_path / "figures/m5_gap.png").exists() and (tmp_path / "figures/m5_mask_policy.png").exists()
    assert len(mask_policy.plot_from_results(tmp_path)) == 2


def test_m6_quick(tmp_path):
    m6d = load_script("m6_generalization")
    m6d.main(m6d.Args(quick=True, out_dir=tmp_path))
    s = json.loads((tmp_path / "m6_summary.json").read_text())
    assert s["experiment"] == "m6" and s["ns"] == [0, 10]
    family = s["families"]["doc_qa"]
    methods = family["by_n"]["10"]["methods"]
    assert {"lut", "supervised_own", "supervised_proxy", "full", "tokens_only", "depth_only", "width_only", "greedy"} <= set(methods)
    assert methods["full"]["mean"]["quality_retention"] == pytest.approx(1.0)
    for m in methods.values():
        assert 0 <= m["mean"]["violation_rate"] <= 1
    assert family["by_n"]["10"]["proxy_families"][0] != "doc_qa"  # a seen family is shown
    assert len(generalization.plot_from_results(tmp_path)) == 2


def test_e6_quick(tmp_path):
    e6d = load_script("e6_ablations")
    e6d.main(e6d.Args(quick=True, out_dir=tmp_path))
    s = json.loads((tmp_path / "e6_summary.json").read_text())
    assert s["experiment"] == "e6"
    assert set(s["knobs"]["lut"]) == set(ablations.KNOB_SUBSETS)
    assert set(s["knob_deltas"]["lut"]) == set(ablations.KNOB_SUBSETS) - {"all"}
    assert "supervised (guardrail off)" in s["switches"] and "lut (family off)" in s["switches"]
    port = s["portability_gpu"]["results"]
    assert "h100 (trained here)" in port and "h200, h200 profiles (reference)" in port
    assert "not run" in s["portability_other_moe_vlm"]
    assert s["portability_task_family"] is None and s["depth_mask"]["m5_gaps"] is None  # nothing in tmp_path
    assert len(ablations.plot_from_results(tmp_path)) == 3


def test_stage_medians_known_values():
    from flexvlm_env.experiments.ablations import stage_medians
    from flexvlm_env.profiles import load_replay_data

    data = load_replay_data("micro", "molmoe-1b-h100")
    out = stage_medians(data)
    assert out["full_config"]["prefill_ms"] == pytest.approx(float(np.median(data.stage_ms[:, -1, 3])))
    assert out["smallest_config"]["vision_encoder_ms"] < out["full_config"]["vision_encoder_ms"]
    assert 0 < out["smallest_over_full_median"] < 1
