"""Issue [lora]'s comparison: per-config quality (family-balanced, complete configs only), the
gap-recovered and full-config-delta numbers on hand-made tables with known answers, merging a
model's tables from several runs (with their answer agreement), the driver and its figure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flexvlm_env.experiments import lora
from flexvlm_env.profiles.loading import REQUESTS_TABLE, profiles_dir
from flexvlm_env.profiles.tables import read_parquet, read_table, write_parquet
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(12, 8, 16), (1, 1, 8), (2, 1, 8), (12, 1, 16)]


def _requests(per_family: int = 2) -> list[tuple[str, str]]:
    requests = read_table(profiles_dir() / REQUESTS_TABLE)
    ids = requests.drop_duplicates("request_id").groupby("family").head(per_family)
    return list(zip(ids["request_id"], ids["family"]))[:8]  # 4 families x 2 requests


def _table(path: Path, quality: dict, weights: str = "w", adapter: str | None = None, answer_suffix: str = "") -> Path:
    """quality: config -> score every request gets there (family means are then that score)."""
    rows = [{"request_id": rid, "family": fam, "crops": c[0], "top_k": c[1], "active_blocks": c[2], "quality": q,
             "answer": f"a{q}{answer_suffix}", "output_tokens": 3}
            for c, q in quality.items() for rid, fam in _requests()]
    meta = {"kind": "quality", "preset": "micro", "weights_sha256": weights, "adapter_sha256": adapter, "device_name": "test",
            "protocol": {"mask_policy": "importance"}, "key": lora.KEY}
    return write_parquet(pd.DataFrame(rows), path, meta)


BASE = {(12, 8, 16): 0.50, (1, 1, 8): 0.10, (2, 1, 8): 0.20, (12, 1, 16): 0.40}
ELASTIC = {(12, 8, 16): 0.52, (1, 1, 8): 0.30, (2, 1, 8): 0.40, (12, 1, 16): 0.50}
ADAPTED = {(12, 8, 16): 0.495, (1, 1, 8): 0.25, (2, 1, 8): 0.30, (12, 1, 16): 0.45}


def test_compare_known_values(tmp_path):
    configs = {}
    for name, q, w in (("base", BASE, "b"), ("elastic", ELASTIC, "e"), ("lora", ADAPTED, "b")):
        frame, _ = lora.load_quality([_table(tmp_path / f"{name}.parquet", q, weights=w)])
        configs[name] = lora.config_quality(frame)
    out = lora.compare(configs, "base", "elastic", ["lora"])
    # gaps 0.2, 0.2, 0.1 (sum 0.5); gains 0.15, 0.10, 0.05 (sum 0.30) -> 0.6 of the gap
    assert out["per_model"]["lora"]["reduced_configs"] == 3
    assert out["per_model"]["lora"]["gap_recovered"] == pytest.approx(0.6)
    assert out["per_model"]["lora"]["full_config_delta"] == pytest.approx(-0.005)
    assert out["per_model"]["lora"]["improved_config_fraction"] == 1.0
    assert out["full"] == pytest.approx({"base": 0.5, "elastic": 0.52, "lora": 0.495})
    sweeps = lora.sweeps(configs)
    assert sweeps["lora"]["top_k"] == pytest.approx({"1": 0.45, "8": 0.495})
    with pytest.raises(ValueError, match="model 'missing' has no quality table"):
        lora.compare(configs, "base", "elastic", ["missing"])


def test_select_variant_rule(tmp_path):
    """Highest mean quality among the candidates within the allowed full-config drop; if none is
    within it, the smallest drop; candidates must share their configurations."""
    def frame(name, quality):
        return lora.load_quality([_table(tmp_path / f"{name}.parquet", quality)])[0]

    base = frame("base", BASE)
    strong = frame("strong", ADAPTED)  # full 0.495 (-0.5 point), best reduced configs
    held = frame("held", {**ADAPTED, (12, 8, 16): 0.50, (1, 1, 8): 0.15})  # full kept, weaker elsewhere
    out = lora.select_variant({"strong": strong, "held": held}, base, max_full_drop=0.01)
    assert out["selected"] == "strong"
    assert out["candidates"]["strong"]["full_config_delta"] == pytest.approx(-0.005)
    assert out["candidates"]["strong"]["mean_quality"] == pytest.approx((0.495 + 0.25 + 0.30 + 0.45) / 4)
    assert lora.select_variant({"strong": strong, "held": held}, base, max_full_drop=0.001)["selected"] == "held"
    dropped = frame("dropped", {**ADAPTED, (12, 8, 16): 0.47})
    assert lora.select_variant({"strong": strong, "dropped": dropped}, base, max_full_drop=0.0)["selected"] == "strong"
    with pytest.raises(ValueError, match="different configurations"):
        lora.select_variant({"strong": strong, "few": frame("few", {(12, 8, 16): 0.5})}, base)
    with pytest.raises(ValueError, match="max_full_drop=-1"):
        lora.select_variant({"strong": strong}, base, max_full_drop=-1)


def test_config_quality_is_family_balanced_and_drops_incomplete_configs(tmp_path):
    frame, _ = lora.load_quality([_table(tmp_path / "t.parquet", BASE)])
    first = frame["request_id"].iloc[0]
    frame.loc[frame["family"] == frame["family"].iloc[0], "quality"] = 1.0  # one family perfect everywhere
    partial = frame[~((frame["request_id"] == first) & (frame["crops"] == 2))]
    out = lora.config_quality(partial).set_index(lora.KNOBS)
    assert (2, 1, 8) not in out.index and len(out) == 3
    n_families = frame["family"].nunique()
    expected = (1.0 + (n_families - 1) * 0.5) / n_families  # mean over families, not over requests
    assert out.loc[(12, 8, 16), "mean_quality"] == pytest.approx(expected)


def test_pack_merges_runs_first_source_wins_and_reports_agreement(tmp_path):
    gpu = _table(tmp_path / "gpu.parquet", {c: BASE[c] for c in CONFIGS[:3]})
    cpu = _table(tmp_path / "cpu.parquet", {c: BASE[c] for c in CONFIGS[2:]})  # overlaps on (2, 1, 8)
    packed = lora.pack_tables([gpu, cpu], tmp_path / "packed.parquet")
    frame, meta = read_parquet(packed)
    assert len(frame) == 4 * len(_requests()) and not frame.duplicated(lora.KEY).any()
    assert meta["overlap"] == {"rows": len(_requests()), "identical_answers": 1.0, "mean_abs_quality_difference": 0.0}
    assert [m["table"] for m in meta["merged_from"]] == [str(gpu), str(cpu)]
    other = _table(tmp_path / "other.parquet", BASE, answer_suffix="x")
    assert lora.source_agreement([read_table(gpu), read_table(other)])["identical_answers"] == 0.0
    with pytest.raises(ValueError, match="different weights_sha256s"):
        lora.load_quality([gpu, _table(tmp_path / "w2.parquet", BASE, weights="other")])


def test_driver_writes_summary_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    script = load_script("lora_compare")
    tables = tuple(f"{name}={_table(tmp_path / f'{name}.parquet', q, weights=w)}"
                   for name, q, w in (("full-config-only", BASE, "b"), ("lora-r16", ADAPTED, "b"), ("elastic", ELASTIC, "e"),
                                      ("lora-r16-a2", {(12, 8, 16): 0.51}, "b")))  # a variant answered at full only
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "flexvlm_adapter.json").write_text(json.dumps({
        "spec": {"rank": 16}, "adapter_parameters": 100, "base_weights_sha256": "b",
        "training": {"step": 4, "samples": 8, "train_seconds": 1.5, "device": "cpu", "args": {"mask_policy": "importance", "lr": 1e-3, "batch_size": 2}}}))
    selection = tmp_path / "selection.json"  # as scripts/lora_gpu.sh PLAN=anchor writes it (device names)
    selection.write_text(json.dumps({"selected": "r16_a2", "rule": "r", "base_full_quality": 0.5,
                                     "candidates": {"r16_a2": {"full_config_delta": 0.0, "mean_quality": 0.4, "configs": 8}}}))
    summary = script.main(script.Args(tables=tables, adapters=(f"lora-r16={adapter}",), base_card=tmp_path / "none.json", out_dir=tmp_path,
                                      headline="lora-r16", selection=selection))
    saved = json.loads((tmp_path / "lora_summary.json").read_text())
    assert saved["gap_recovered"] == pytest.approx(0.6) and saved["full_config_delta"] == pytest.approx(-0.005)
    assert saved["bars"] == {"gap_recovered_at_least_0.5": True, "full_config_drop_at_most_1_point": True}
    rows = saved["models"]["lora-r16"]["configs"]
    assert {(r["crops"], r["top_k"], r["active_blocks"]) for r in rows} == set(CONFIGS)
    assert all(np.isfinite(r["latency_ms_mean"]) and r["latency_ms_mean"] > 0 for r in rows)
    lat = {(r["crops"], r["top_k"], r["active_blocks"]): r["latency_ms_mean"] for r in rows}
    assert lat[(1, 1, 8)] < lat[(12, 8, 16)]  # composed latency follows the knobs
    assert saved["models"]["lora-r16"]["adapter"]["tensor_bytes_fp32"] == 400
    assert summary["headline"] == "lora-r16" and summary["adapted"] == ["lora-r16"]
    # A full-only variant is reported at the full configuration, outside the gap.
    assert saved["full_only"] == {"lora-r16-a2": {"full_quality": pytest.approx(0.51), "full_config_delta": pytest.approx(0.01)}}
    paired = saved["full_config_paired"]["lora-r16"]  # every request 0.495 vs 0.50: a constant change
    assert paired["delta_mean"] == pytest.approx(-0.005) and paired["delta_se"] == pytest.approx(0.0, abs=1e-12)
    assert paired["identical_answers"] == 0.0 and paired["requests"] == 8
    assert saved["variant_selection"]["selected"] == "lora-r16-a2" and list(saved["variant_selection"]["candidates"]) == ["lora-r16-a2"]
    figure = tmp_path / "figures" / "lora_frontiers.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="must be NAME=PATH"):
        script.main(script.Args(tables=("no-equals-sign",), out_dir=tmp_path))
