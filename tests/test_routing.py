"""The router-mass diagnostic (flexvlm_env.model.routing): known values, invariants, bad input."""
import pytest
import torch

from flexvlm_env.config import Config
from flexvlm_env.evaluation import QualityEvaluator
from flexvlm_env.model.routing import expert_substitution, router_mass
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


# Expert substitution: which experts the answers need (flexvlm_env.model.routing.expert_substitution).

@pytest.fixture(scope="module")
def shipped():
    return load_model("micro", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def mixed_samples():
    return [s for family in ("coco_2014_vqa", "okvqa", "science_qa_img", "mmmu")
            for s in load_samples(family, "procedural", "val", n=3, seed=0)]


def test_substituting_the_top_k_experts_is_the_model_itself(shipped, mixed_samples):
    config = Config(1, 8, 12)
    plain = QualityEvaluator(shipped, mixed_samples, batch_size=16)
    out = expert_substitution(shipped, mixed_samples, config, ["top8", "top2", "rank1", "top1"], batch_size=16)
    subs = out["substitutions"]
    assert subs["top8"]["scores"] == plain.scores(config).tolist()
    # top<k> recomputes exactly what the model runs at top_k = k: the substitution is the knob.
    assert subs["top2"]["scores"] == plain.scores(Config(1, 2, 12)).tolist()
    assert subs["rank1"]["scores"] == subs["top1"]["scores"]
    assert out["requests"] == len(mixed_samples) and out["config"] == [1, 8, 12]
    assert set(subs["top8"]["per_family"]) == {"coco_2014_vqa", "okvqa", "science_qa_img", "mmmu"}
    for block in shipped.module.transformer.blocks:  # the hooks are gone
        assert not block.mlp._forward_hooks


def test_the_shipped_model_needs_its_heaviest_expert(shipped):
    """Known behaviour of the shipped weights (results/expert_substitution.json has it on 1 800
    requests): the heaviest expert alone answers about as well as all eight; without the MoE, or
    with the second-heaviest expert alone, the answers fall apart."""
    samples = [s for family in ("coco_caption", "okvqa") for s in load_samples(family, "procedural", "val", n=4, seed=0)]
    out = expert_substitution(shipped, samples, Config(1, 8, 12), ["top8", "top1", "zero", "rank2"], batch_size=8)
    subs = {name: v["mean"] for name, v in out["substitutions"].items()}
    assert subs["top8"] >= 0.75 and subs["top1"] >= subs["top8"] - 0.25
    assert max(subs["zero"], subs["rank2"]) <= subs["top8"] - 0.4


def test_random_substitution_is_seeded(shipped, mixed_samples):
    first = expert_substitution(shipped, mixed_samples[:4], Config(1, 8, 8), ["random"], seed=3)
    again = expert_substitution(shipped, mixed_samples[:4], Config(1, 8, 8), ["random"], seed=3)
    assert first["substitutions"]["random"]["scores"] == again["substitutions"]["random"]["scores"]


@pytest.mark.parametrize("name", ["top9", "top0", "rank0", "rank65", "bottom1", "top", "", "zero1"])
def test_bad_substitutions_are_refused(vlm, samples, name):
    with pytest.raises(ValueError, match="substitution"):
        expert_substitution(vlm, samples, Config(1, 8, 16), [name])


def test_empty_substitutions_and_samples_are_refused(vlm, samples):
    with pytest.raises(ValueError, match="substitutions is empty"):
        expert_substitution(vlm, samples, Config(1, 8, 16), [])
    with pytest.raises(ValueError, match="samples is empty"):
        expert_substitution(vlm, [], Config(1, 8, 16), ["zero"])


def test_the_fast_cuda_path_is_refused(samples):
    fast = load_model("micro", weights="random", device="cpu", dtype="float32")
    fast.use_cuda_graphs = True  # what a CUDA model loaded with the defaults has
    with pytest.raises(ValueError, match="use_cuda_graphs=False, moe_impl='reference'"):
        expert_substitution(fast, samples, Config(1, 8, 16), ["zero"])
