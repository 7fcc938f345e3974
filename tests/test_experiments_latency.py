"""E1 (stage-aware latency decomposition) and M2 (latency repeatability): logic with known values,
bad-input errors, the operator attribution on a tiny model, and the drivers' --quick runs."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flexvlm_env.config import Config
from flexvlm_env.experiments import latency_decomposition as e1
from flexvlm_env.experiments import repeatability as m2
from flexvlm_env.experiments.common import read_json
from flexvlm_env.model.args import ModelArgs, VisionArgs

ROOT = Path(__file__).resolve().parents[1]

SMALL = ModelArgs(
    name="small", d_model=8, n_layers=4, n_heads=2, n_experts=4, expert_hidden=2, top_k=2, vocab_size=16, embedding_size=16,
    additional_vocab_size=0, projector_hidden=4, max_crops=4, max_seq_len=256,
    vision=VisionArgs(width=4, n_layers=2, n_heads=1, head_dim=4, mlp_dim=8, vit_layers=(-1,), crop_px=28, patch_px=14, pool=2, margin_patches=0),
)


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_request_flops_known_llm_values():
    # d=8, E=4, H=2: per token and block 2*(4*64 + 8*4 + k*3*2*8) = 2*(288 + 48k); LM head 2*8*16 = 256.
    f = e1.request_flops(SMALL, crops=1, input_tokens=3, output_tokens=1, top_k=1, active_blocks=2)
    per_token_block = 2 * (4 * 64 + 32 + 1 * 3 * 2 * 8)
    assert f["prefill"] == 2 * (3 * per_token_block + 2 * 2 * 8 * 6) + 256  # causal attention: 1+2+3 = 6 key positions
    assert f["decode"] == 0  # the only output token comes from prefill
    two = e1.request_flops(SMALL, crops=1, input_tokens=3, output_tokens=3, top_k=1, active_blocks=2)
    # two decode steps at contexts 4 and 5
    assert two["decode"] == 2 * (2 * per_token_block + 256) + 2 * 2 * 2 * 8 * (4 + 5)
    assert two["total"] == pytest.approx(sum(two[k] for k in ("vision_encoder", "projector", "prefill", "decode")))


def test_request_flops_scales_with_knobs():
    base = e1.request_flops(SMALL, crops=1, input_tokens=10, output_tokens=5, top_k=1, active_blocks=2)
    wider = e1.request_flops(SMALL, crops=1, input_tokens=10, output_tokens=5, top_k=3, active_blocks=2)
    # two more experts per token: 2 * 2*3*H*d FLOPs more per token and block, 10 prefill + 4 decode tokens
    assert wider["prefill"] - base["prefill"] == 2 * 10 * 2 * 2 * 3 * 2 * 8
    assert wider["decode"] - base["decode"] == 2 * 4 * 2 * 2 * 3 * 2 * 8
    more_crops = e1.request_flops(SMALL, crops=3, input_tokens=10, output_tokens=5, top_k=1, active_blocks=2)
    assert more_crops["vision_encoder"] == pytest.approx(2 * base["vision_encoder"])  # 4 views instead of 2
    assert more_crops["projector"] == pytest.approx(2 * base["projector"])
    assert more_crops["prefill"] == base["prefill"]  # same token count given


def test_request_flops_rejects_bad_values():
    with pytest.raises(ValueError, match="top_k=5"):
        e1.request_flops(SMALL, crops=1, input_tokens=3, output_tokens=1, top_k=5, active_blocks=2)
    with pytest.raises(ValueError, match="output_tokens=0"):
        e1.request_flops(SMALL, crops=1, input_tokens=3, output_tokens=0, top_k=1, active_blocks=2)


# ---------------------------------------------------------------------------------------------
# small helpers


def test_build_prompt_hits_target_and_validates():
    encode = lambda text: list(range(len(text.split()) + 3))
    for target in (4, 15, 40, 120):
        assert len(encode(e1.build_prompt(encode, target))) == target
    assert e1.build_prompt(encode, 1) == e1.PROMPT_WORDS[0]  # shorter than the template: one word
    with pytest.raises(ValueError, match="target_tokens=0"):
        e1.build_prompt(encode, 0)


def test_spec_validation():
    assert e1.Spec().knobs[0] == ("full", 8, 16)
    with pytest.raises(ValueError, match="repeats=0"):
        e1.Spec(repeats=0)
    with pytest.raises(ValueError, match="prompt labels"):
        e1.Spec(sweep_prompts=("huge",))
    with pytest.raises(ValueError, match="crops"):
        e1.Spec(crops=())


def test_fits_and_correlations_known_values():
    fit = e1.linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)
    assert e1.linear_fit([2, 2], [1, 3])["slope"] is None
    corr = e1.correlations([1, 2, 3, 4], [10, 20, 30, 40])
    assert corr["pearson"] == pytest.approx(1) and corr["spearman"] == pytest.approx(1)
    assert e1.correlations([1, 2, 3, 4], [4, 3, 2, 1])["spearman"] == pytest.approx(-1)
    assert e1.device_tag({"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert e1.device_tag({"device_type": "cpu", "device_name": "AMD EPYC"}) == "cpu"


# ---------------------------------------------------------------------------------------------
# operator attribution


def _event(name, parent=None, self_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=self_us)


def test_event_and_kernel_categories():
    moe = _event(e1.LABEL_PREFIX + "moe_experts")
    gate = _event(e1.LABEL_PREFIX + "moe_routing", moe)
    norm = _event(e1.LABEL_PREFIX + "other", moe)
    assert e1.event_category(_event("aten::mm", gate)) == "moe_routing"
    assert e1.event_category(_event("aten::topk", moe)) == "moe_routing"  # MoE.route's top-k
    assert e1.event_category(_event("aten::mm", moe)) == "moe_experts"
    assert e1.event_category(_event("aten::rms_norm", norm)) == "other"
    assert e1.event_category(_event("aten::mm")) == "other"  # LM head: outside every range
    assert e1.kernel_category("_decode_attention_split_kernel") == "attention"
    assert e1.kernel_category("_softmax_topk_kernel") == "moe_routing"
    assert e1.kernel_category("_grouped_gemm_kernel") == "moe_experts"
    assert e1.kernel_category("_add_rms_norm_kernel") == "other"
    assert e1.kernel_category("sm90_xmma_gemm_bf16") is None
    attn = _event(e1.LABEL_PREFIX + "attention", self_us=2.0)
    totals, top = e1.attribute_events([attn, _event("aten::mm", attn, 5.0), _event("aten::topk", moe, 1.5), moe, _event("aten::argmax", None, 0.5)], "cpu")
    assert totals == {"attention": 7.0, "moe_routing": 1.5, "moe_experts": 0.0, "other": 0.5}
    assert top[0] == {"name": "aten::mm", "category": "attention", "us": 5.0}


def test_attribute_events_cuda_kernels():
    import torch

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def device_event(name, us):
        return SimpleNamespace(name=name, device_type=cuda, time_range=SimpleNamespace(elapsed_us=lambda: us))

    def kernel(name, us):
        return SimpleNamespace(name=name, duration=us)

    moe = SimpleNamespace(name=e1.LABEL_PREFIX + "moe_experts", cpu_parent=None, device_type=cpu,
                          kernels=[kernel("_grouped_gemm_kernel", 30.0), kernel(e1.LABEL_PREFIX + "moe_experts", 99.0)])
    gate = SimpleNamespace(name="aten::mm", cpu_parent=SimpleNamespace(name=e1.LABEL_PREFIX + "moe_routing", cpu_parent=moe),
                           device_type=cpu, kernels=[kernel("sm90_gemm", 4.0)])
    fused = SimpleNamespace(name="aten::empty", cpu_parent=None, device_type=cpu, kernels=[kernel("_decode_attention_split_kernel", 6.0)])
    events = [moe, gate, fused, device_event("_grouped_gemm_kernel", 30.0), device_event("sm90_gemm", 4.0),
              device_event("_decode_attention_split_kernel", 6.0), device_event(e1.LABEL_PREFIX + "moe_experts", 99.0),  # annotation span
              device_event("_softmax_topk_kernel", 2.0), device_event("elementwise_kernel", 1.0)]  # unlinked kernels
    totals, _ = e1.attribute_events(events, "cuda")
    assert totals == {"attention": 6.0, "moe_routing": 6.0, "moe_experts": 30.0, "other": 1.0}


def test_profile_llm_operators_on_tiny_model(tiny_vlm):
    from PIL import Image

    image = Image.new("RGB", (64, 48), (10, 200, 30))
    profile = e1.profile_llm_operators(tiny_vlm, image, "What is this?", Config(crops=1, top_k=2, active_blocks=3), decode_steps=2)
    assert profile["decode_steps"] == 2 and profile["clock"] == "CPU self time"
    for phase in ("prefill", "decode"):
        ms = profile["phases"][phase]["ms"]
        assert set(ms) == set(e1.CATEGORIES)
        assert all(ms[c] > 0 for c in e1.CATEGORIES), (phase, ms)
    # the hooks are gone afterwards
    assert not any(block.attn._forward_hooks or block.mlp._forward_pre_hooks for block in tiny_vlm.module.transformer.blocks)


# ---------------------------------------------------------------------------------------------
# M2


def test_repeats_needed_known_cases():
    constant = m2.repeats_needed(np.full(40, 10.0), "mean", 0.01)
    assert constant["n"] == 3 and constant["probability_within"]["40"] == 1.0
    tight = m2.repeats_needed(10.0 + 0.01 * np.random.default_rng(0).standard_normal(100), "p95", 0.05)
    assert tight["n"] == 3  # 0.1 % spread: every resample's P95 is within 5 %
    spread = m2.repeats_needed(np.random.default_rng(0).lognormal(0, 1.0, 50), "mean", 0.01)
    assert spread["n"] is None and spread["n_taken"] == 50  # a CoV above 100 % needs far more than 50
    with pytest.raises(ValueError, match="statistic='median'"):
        m2.repeats_needed(np.ones(5), "median", 0.01)
    with pytest.raises(ValueError, match="at least 2"):
        m2.repeats_needed(np.ones(1), "mean", 0.01)


def test_analyse_config_known_values():
    total = [10.0, 10.0, 12.0, 12.0]
    ms = {s: [1.0, 1.0, 1.0, 1.0] for s in e1.STAGES}
    ms["decode"] = [6.0, 6.0, 8.0, 8.0]
    ms["total"] = total
    out = m2.analyse_config(ms)
    assert out["cov_total"] == pytest.approx(1.0 / 11.0)
    assert out["most_variable_stage"] == "decode" and out["stage_variance_share"]["decode"] == pytest.approx(1.0)
    assert out["drift_last_over_first_quarter"] == pytest.approx(0.2)
    assert out["repeats_needed_mean_normal_theory"] == int(np.ceil((1.96 / 11 / 0.01) ** 2))


def _m2_raw(preset, device_type, totals):
    stages = {s: [1.0] * len(totals) for s in e1.STAGES}
    stages["decode"] = [t - 4.0 for t in totals]
    return {"kind": "m2_raw", "preset": preset, "dtype": "bfloat16", "device": {"device_type": device_type, "device_name": "NVIDIA H100 80GB HBM3"},
            "device_tag": "h100" if device_type == "cuda" else "cpu", "cuda_graphs": True, "warmup": 5, "repeats": len(totals),
            "output_tokens": 32, "truncated": [],
            "configs": {"low": {"crops": 1, "top_k": 1, "active_blocks": 8, "input_tokens": 300, "output_tokens": 32,
                                "ms": {**stages, "total": totals}}}}


def test_m2_analyse_cov_bar(tmp_path):
    steady = list(100.0 + 0.5 * np.sin(np.arange(60)))  # CoV ~0.35 %
    noisy = list(100.0 + 10.0 * np.sin(np.arange(60)))  # CoV ~7 %
    summary, data = m2.analyse([(tmp_path / "a.json", _m2_raw("molmoe-1b", "cuda", steady)), (tmp_path / "b.json", _m2_raw("micro", "cuda", noisy))])
    bar = summary["cov_bar"]["by_run"]
    assert list(bar) == ["molmoe-1b_h100"]  # the bar concerns molmoe-1b on a GPU only
    assert bar["molmoe-1b_h100"]["holds"] and bar["molmoe-1b_h100"]["what_varies"]["low"]["most_variable_stage"] == "decode"
    assert summary["runs"]["micro_h100"]["max_cov_total"] > m2.COV_BAR
    assert data["runs"]["micro_h100"]["configs"]["low"]["ms"]["total"] == noisy
    failing, _ = m2.analyse([(tmp_path / "c.json", _m2_raw("molmoe-1b", "cuda", noisy))])
    assert not failing["cov_bar"]["by_run"]["molmoe-1b_h100"]["holds"]
    with pytest.raises(ValueError, match="two raw files for micro_h100"):
        m2.analyse([(tmp_path / "b.json", _m2_raw("micro", "cuda", noisy)), (tmp_path / "d.json", _m2_raw("micro", "cuda", steady))])


def test_parse_configs():
    assert m2.parse_configs(["1,1,8", "x:4,4,12"]) == (("low", 1, 1, 8), ("x", 4, 4, 12))
    with pytest.raises(ValueError, match="crops,top_k,active_blocks"):
        m2.parse_configs(["1,1"])
    with pytest.raises(ValueError, match=">= 1"):
        m2.parse_configs(["0,1,8"])
    with pytest.raises(ValueError, match="distinct"):
        m2.parse_configs(["a:1,1,8", "a:2,2,8"])


def test_collect_raw_rejects_missing_and_wrong_kind(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        e1.collect_raw([tmp_path / "nope"], tmp_path, e1.RAW_PREFIX, "e1_raw")
    with pytest.raises(ValueError, match="no e1_raw_"):
        e1.collect_raw([tmp_path], tmp_path, e1.RAW_PREFIX, "e1_raw")
    (tmp_path / "e1_raw_x.json").write_text(json.dumps({"kind": "m2_raw"}))
    with pytest.raises(ValueError, match="not a e1_raw file"):
        e1.collect_raw([tmp_path], tmp_path, e1.RAW_PREFIX, "e1_raw")


def test_collect_raw_reads_gzipped_files_and_prefers_a_fresh_uncompressed_copy(tmp_path):
    results, fresh = tmp_path / "results", tmp_path / "fresh"
    results.mkdir(), fresh.mkdir()
    with gzip.open(results / "e1_raw_a.json.gz", "wt") as handle:  # as results/ keeps them
        json.dump({"kind": "e1_raw", "version": "committed"}, handle)
    [(path, raw)] = e1.collect_raw([results], results, e1.RAW_PREFIX, "e1_raw")
    assert path.name == "e1_raw_a.json.gz" and raw["version"] == "committed"
    # the same run measured again: the uncompressed file, copied into results, replaces it
    (fresh / "e1_raw_a.json").write_text(json.dumps({"kind": "e1_raw", "version": "fresh"}))
    [(path, raw)] = e1.collect_raw([results, fresh], results, e1.RAW_PREFIX, "e1_raw")
    assert path == results / "e1_raw_a.json" and raw["version"] == "fresh"
    [(path, raw)] = e1.collect_raw([results], results, e1.RAW_PREFIX, "e1_raw")
    assert path.name == "e1_raw_a.json" and raw["version"] == "fresh"


# ---------------------------------------------------------------------------------------------
# drivers (--quick)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_e1_driver_quick(tmp_path):
    _run("e1_latency_decomposition.py", "--quick", "--out-dir", str(tmp_path / "raw"), "--results", str(tmp_path / "results"))
    results = tmp_path / "results"
    assert (results / "e1_raw_micro_cpu.json").exists()  # the raw file was copied next to the summary
    summary = json.loads((results / "e1_summary.json").read_text())
    assert summary["experiment"] == "e1" and set(summary["devices"]) == {"micro_cpu"}
    head = summary["headline"]["micro_cpu"]
    assert 0 < head["decode_share_at_longest_output_full"] < 1
    assert set(head["median_stage_share_full"]) == set(e1.STAGES)
    assert sum(head["llm_operator_share_full"]["prefill"].values()) == pytest.approx(1)
    assert head["decode_ms_per_output_token"]["full"] > 0
    data = read_json(results / "e1_data.json.gz")["runs"]["micro_cpu"]
    for entry in data["regimes"]:
        assert entry["total_ms"] >= max(entry[f"{s}_ms"] for s in e1.STAGES)
        assert entry["gflops"]["total"] > 0
    figures = sorted(p.name for p in (results / "figures").glob("e1_*.png"))
    assert figures == ["e1_flops_vs_latency.png", "e1_operators.png", "e1_scaling.png", "e1_stage_stack.png"]
    for path in (results / "figures").glob("e1_*.png"):
        path.unlink()
    assert len(e1.plot_from_results(results)) == 4  # from the data files alone


def test_m2_driver_quick(tmp_path):
    _run("m2_repeatability.py", "--quick", "--out-dir", str(tmp_path), "--results", str(tmp_path))
    summary = json.loads((tmp_path / "m2_summary.json").read_text())
    run = summary["runs"]["micro_cpu"]
    assert list(run["configs"]) == ["low", "medium", "high"]
    for config in run["configs"].values():
        assert config["stats"]["total"]["n"] == 6 and config["cov_total"] >= 0
        assert set(config["repeats_needed"]) == {"mean", "p95", "p99"}
    assert summary["cov_bar"]["by_run"] == {}  # no molmoe-1b GPU run here
    assert len(m2.plot_from_results(tmp_path)) == 3


def test_drivers_reject_bad_arguments(tmp_path):
    for script, args, message in (("e1_latency_decomposition.py", ["--preset", "huge"], "--preset 'huge'"),
                                  ("m2_repeatability.py", ["--configs", "1,1"], "--configs"),
                                  ("m2_repeatability.py", ["--repeats", "1"], "--repeats 1")):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--out-dir", str(tmp_path)],
                                check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
