"""The router-mass diagnostic (flexvlm_env.model.routing): known values, invariants, bad input."""
import pytest
import torch

from flexvlm_env.config import Config
from flexvlm_env.model.routing import router_mass
from flexvlm_env.model.runtime import load_model
from flexvlm_env.tasks import load_samples


@pytest.fixture(scope="module")
def vlm():
    return load_model("micro", weights="random", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def samples():
    return load_samples("coco_2014_vqa", "procedural", "val", n=2, seed=0)


def test_masses_are_cumulative_shares(vlm, samples):
    out = router_mass(vlm, samples, Config(1, 8, 16), ks=(1, 2, 4, 8, 64))
    assert sorted(out["per_block"]) == list(range(16)) and out["tokens"] > 0
    for block in out["per_block"].values():
        mass = block["top_k_mass"]
        assert all(0 < a <= b for a, b in zip(mass, mass[1:]))  # more experts never carry less
        # The k heaviest of 64 experts carry at least k/64 (what k experts drawn at random would).
        assert all(m >= k / 64 - 1e-9 for k, m in zip(out["ks"], mass))
        assert mass[-1] == pytest.approx(1.0, abs=1e-6)  # all 64 experts carry all of it
        assert block["attn_update_ratio"] > 0 and block["moe_update_ratio"] > 0
    for block in vlm.module.transformer.blocks:  # the hooks are gone
        assert not block.mlp.gate._forward_hooks and not block.mlp._forward_hooks and not block.attn._forward_hooks


def test_a_flat_router_gives_k_over_n(samples):
    flat = load_model("micro", weights="random", device="cpu", dtype="float32")
    with torch.no_grad():
        for block in flat.module.transformer.blocks:
            block.mlp.gate.weight.zero_()  # every expert gets probability 1/64
    out = router_mass(flat, samples[:1], Config(1, 8, 16), ks=(1, 8))
    assert out["mean_top_k_mass"] == pytest.approx([1 / 64, 8 / 64], abs=1e-6)


def test_experts_that_output_nothing_give_a_zero_moe_update(samples):
    silent = load_model("micro", weights="random", device="cpu", dtype="float32")
    with torch.no_grad():
        for block in silent.module.transformer.blocks:
            block.mlp.w_down.zero_()
    out = router_mass(silent, samples[:1], Config(1, 8, 16))
    assert out["median_moe_update_ratio"] == 0.0 and out["median_attn_update_ratio"] > 0


def test_only_the_active_blocks_are_reported(vlm, samples):
    out = router_mass(vlm, samples[:1], Config(1, 1, 8))
    assert len(out["per_block"]) == 8 and out["ks"] == [1, 2, 4, 8]


@pytest.mark.parametrize("ks", [(), (0,), (65,), (4, 2), (2, 2)])
def test_bad_ks_are_refused(vlm, samples, ks):
    with pytest.raises(ValueError, match="ks="):
        router_mass(vlm, samples, Config(1, 8, 16), ks=ks)


def test_no_samples_is_refused(vlm):
    with pytest.raises(ValueError, match="samples is empty"):
        router_mass(vlm, [], Config(1, 8, 16))
