"""LoRA adapters (peft) on the native MolmoE: only adapters train, a fresh adapter changes nothing,
save/apply round trip, merged = unmerged through `load_model` at full and reduced configs, the
teacher-forced loss fine-tunes the adapters, and clear errors for bad specs and adapters."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, load_script
from flexvlm_env.config import Config
from flexvlm_env.model.args import preset_args
from flexvlm_env.model.checkpoint import save_flexvlm
from flexvlm_env.model.generate import embed_inputs
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.runtime import VLM, assets_dir, load_model
from flexvlm_env.model.tokenizer import TextTokenizer
from flexvlm_env.tasks.procedural import generate_samples
from flexvlm_env.training import (
    ElasticKnobs, LoraSpec, TrainBatchSpec, adapter_parameter_count, add_lora, answer_kl, apply_adapter, batch_views, build_batch,
    read_adapter_metadata, save_adapter, teacher_forced_loss,
)

MICRO = preset_args("micro")
SPEC = LoraSpec(rank=4, alpha=8.0)
SEED = 0  # base weights: MolmoE(MICRO).init_random_(SEED) == load_model("micro", weights="random", seed=SEED)


def _base(args=MICRO) -> MolmoE:
    return MolmoE(args).init_random_(SEED)


def _token_ids(length: int = 12) -> torch.Tensor:
    return torch.randint(0, MICRO.embedding_size, (1, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(module: MolmoE, ids: torch.Tensor, top_k: int = MICRO.top_k) -> torch.Tensor:
    """Text-only logits of every position through all blocks (the default targets are all decoder layers)."""
    n = module.args.n_layers
    hidden = module.transformer(module.transformer.wte(ids), torch.arange(ids.shape[1])[None], tuple(range(n)), (top_k,) * n)
    return module.lm_head(hidden)


def _perturb_(peft_model, scale: float = 0.3, seed: int = 2) -> None:
    """A trained-looking adapter: B != 0 (peft initialises it to zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[1] ** 0.5)


def _lora_layers(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters() if "lora_" in name]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """An adapter saved from a perturbed in-memory model, and that model's logits on `_token_ids()`."""
    peft_model = add_lora(_base(), SPEC)
    _perturb_(peft_model)
    directory = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapter(peft_model, directory, metadata={"spec": asdict(SPEC), "steps": 0})
    return directory, _logits(peft_model.base_model.model, _token_ids())


@pytest.fixture(scope="module")
def micro_tokenizer() -> TextTokenizer:
    return TextTokenizer.from_file(assets_dir("micro"))


def test_add_lora_trains_only_the_adapters():
    base = _base()
    n_base = sum(p.numel() for p in base.parameters())
    peft_model = add_lora(base, SPEC)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    d, experts, r = MICRO.d_model, MICRO.n_experts, SPEC.rank
    # rank * (in + out) per layer: att_proj d -> 3d, attn_out d -> d, router gate d -> experts.
    expected = MICRO.n_layers * r * ((d + 3 * d) + (d + d) + (d + experts))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected
    assert adapter_parameter_count(peft_model) == expected
    assert sum(p.numel() for p in peft_model.parameters()) == n_base + expected
    assert peft_model.base_model.model is base  # the MolmoE itself carries the layers

    head = add_lora(_base(), LoraSpec(rank=2, target_modules=("lm_head",)))
    assert adapter_parameter_count(head) == 2 * (d + MICRO.embedding_size)


def test_fresh_adapter_is_the_identity_until_trained():
    base = _base()
    ids = _token_ids()
    before = _logits(base, ids)
    peft_model = add_lora(base, SPEC)
    assert torch.equal(_logits(base, ids), before)  # B = 0
    _perturb_(peft_model)
    assert (_logits(base, ids) - before).abs().max() > 1e-2


def test_save_then_apply_gives_the_in_memory_logits(adapted):
    directory, expected = adapted
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "flexvlm_adapter.json"]
    assert not [p for p in directory.parent.iterdir() if p.name != "adapter"]  # no staging directory left behind
    assert read_adapter_metadata(directory) == {"spec": {**asdict(SPEC), "target_modules": list(SPEC.target_modules)}, "steps": 0}
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == SPEC.rank

    unmerged = apply_adapter(_base(), directory, merge=False)
    assert isinstance(unmerged, MolmoE) and len(_lora_layers(unmerged)) == 2 * 3 * MICRO.n_layers
    torch.testing.assert_close(_logits(unmerged, _token_ids()), expected, rtol=0, atol=1e-6)

    base = _base()
    merged = apply_adapter(base, directory, merge=True)
    assert merged is base and type(merged) is MolmoE and not _lora_layers(merged)
    assert type(merged.transformer.blocks[0].attn.att_proj) is nn.Linear
    assert all(p.requires_grad for p in merged.parameters())  # flags as they were before applying
    torch.testing.assert_close(_logits(merged, _token_ids()), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def adapter_vlms(adapted) -> dict[str, VLM]:
    directory, _ = adapted
    return {
        "base": load_model("micro", weights="random", device="cpu", seed=SEED),
        "merged": load_model("micro", weights="random", device="cpu", seed=SEED, adapter=directory),
        "unmerged": load_model("micro", weights="random", device="cpu", seed=SEED, adapter=directory, merge_adapter=False),
    }


def _sequence_logits(vlm: VLM, sample, config: Config, token_ids: list[int]) -> torch.Tensor:
    """Logits at every generated position, by a full recompute over the prompt and the answer."""
    request = vlm.prepare(sample.image, sample.prompt, config)
    ids = torch.cat([request.input_ids, torch.tensor(token_ids[:-1], dtype=torch.long)])[None].to(vlm.device)
    with torch.inference_mode():
        features = vlm.module.vision_backbone.project(vlm.encode_image(request.image))
        embeds = embed_inputs(vlm.module, ids, features, request.image.image_input_idx)
        positions = torch.arange(ids.shape[1], device=vlm.device)[None]
        hidden = vlm.module.transformer(embeds, positions, vlm.plan(config), config.top_k_per_block(vlm.args.n_layers))
        return vlm.module.lm_head(hidden)[0, request.input_ids.shape[0] - 1:]


@pytest.mark.parametrize("config", [Config(crops=12, top_k=8, active_blocks=16), Config(crops=2, top_k=1, active_blocks=8)])
def test_load_model_merged_equals_unmerged(adapter_vlms, adapted, config):
    sample = generate_samples("tally_qa", "val", n=1)[0]
    results = {name: vlm.generate(sample.image, sample.prompt, config, max_new_tokens=6, ignore_eos=True) for name, vlm in adapter_vlms.items()}
    assert results["merged"].token_ids == results["unmerged"].token_ids
    logits = {name: _sequence_logits(adapter_vlms[name], sample, config, results["merged"].token_ids) for name in adapter_vlms}
    torch.testing.assert_close(logits["merged"], logits["unmerged"], rtol=0, atol=1e-5)
    assert (logits["merged"] - logits["base"]).abs().max() > 1e-2  # the adapter is really there
    merged, unmerged = adapter_vlms["merged"], adapter_vlms["unmerged"]
    assert merged.adapter == unmerged.adapter == str(adapted[0]) and len(merged.adapter_sha256) == 64
    assert (merged.adapter_merged, unmerged.adapter_merged, adapter_vlms["base"].adapter) == (True, False, None)
    assert not _lora_layers(merged.module) and _lora_layers(unmerged.module)


def test_lora_fine_tuning_lowers_the_loss(micro_tokenizer):
    """The shipped micro weights, fine-tuned on one fixed batch through the teacher-forced loss."""
    torch.manual_seed(0)
    module = load_model("micro", device="cpu").module
    base = {name: p.detach().clone() for name, p in module.named_parameters()}
    peft_model = add_lora(module, LoraSpec(rank=8, alpha=16.0))
    batch = build_batch(0, TrainBatchSpec(batch_size=4), ElasticKnobs(enabled=False, crops_choices=(1,)), MICRO, micro_tokenizer)
    images, masks = batch_views(batch, 1, MICRO.vision, micro_tokenizer.special, "cpu")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        loss, _ = teacher_forced_loss(module, images, masks, batch["input_ids"], batch["labels"], batch["feature_pos"],
                                      batch["feature_rows"], tuple(range(MICRO.n_layers)), MICRO.top_k, micro_tokenizer.special.pad)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {name: p.grad for name, p in module.named_parameters()}
            assert all(g is None for name, g in grads.items() if "lora_" not in name)
            assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for name, param in module.named_parameters():  # the base weights never moved
        if "lora_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer.", ".")]), name
    # The anchor's reference: with the adapters disabled the same module gives the base's logits,
    # and the trained adapter has moved the answers away from them (KL > 0).
    plain = MolmoE(MICRO)
    plain.load_state_dict({name: value for name, value in base.items()})
    args = (images, masks, batch["input_ids"], batch["labels"], batch["feature_pos"], batch["feature_rows"],
            tuple(range(MICRO.n_layers)), MICRO.top_k, micro_tokenizer.special.pad)
    with torch.no_grad():
        _, adapted = teacher_forced_loss(module, *args)
        with peft_model.disable_adapter():
            _, disabled = teacher_forced_loss(module, *args)
        _, reference = teacher_forced_loss(plain, *args)
    torch.testing.assert_close(disabled["logits"], reference["logits"], rtol=0, atol=1e-5)
    assert answer_kl(adapted["logits"], reference["logits"], batch["labels"]) > 1e-3
    assert answer_kl(reference["logits"], reference["logits"], batch["labels"]) == pytest.approx(0.0, abs=1e-7)


def test_answer_kl_known_value():
    """KL(reference || model) averaged over answer tokens only."""
    from math import log

    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    reference = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]]]))
    labels = torch.tensor([[0, -100, 1]])  # the middle position is not an answer token
    expected = (0.9 * log(0.9 / 0.5) + 0.1 * log(0.1 / 0.5) + 0.5 * log(0.5 / 0.2) + 0.5 * log(0.5 / 0.8)) / 2
    assert answer_kl(logits, reference, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank=0"),
    (dict(rank=2.0), "rank=2.0"),
    (dict(alpha=0.0), "alpha=0.0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(target_modules=()), r"target_modules=\(\)"),
    (dict(target_modules="gate"), "target_modules='gate'"),
])
def test_lora_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSpec(**kwargs)


def test_add_lora_rejects_targets_that_are_not_linear_layers():
    base = _base()
    with pytest.raises(ValueError, match=r"'q_proj' matches no nn.Linear in MolmoE; its linear layers end in: .*'att_proj'.*'lm_head'"):
        add_lora(base, LoraSpec(target_modules=("att_proj", "q_proj")))
    with pytest.raises(ValueError, match=r"'mlp' matches model.transformer.blocks.0.mlp \(MoE\), which is not an nn.Linear"):
        add_lora(base, LoraSpec(target_modules=("mlp",)))
    assert not _lora_layers(base)  # checked before anything was injected
    add_lora(base, SPEC)
    with pytest.raises(ValueError, match="already carries adapter layers"):
        add_lora(base, SPEC)


def test_apply_adapter_errors_name_the_path(adapted, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"adapter directory {tmp_path / 'missing'} does not exist"):
        apply_adapter(_base(), tmp_path / "missing")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors in adapter directory .*pickled .*pickle files are never loaded"):
        apply_adapter(_base(), tmp_path / "pickled")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model("micro", weights="random", device="cpu", adapter=tmp_path / "missing")


def _adapter_for(args, directory: Path, rank: int = SPEC.rank) -> Path:
    return save_adapter(add_lora(_base(args), replace(SPEC, rank=rank)), directory)


@pytest.mark.parametrize("source, match", [
    ("d_model", r"does not fit this MolmoE \(micro\): \d+ tensors differ in shape"),
    ("depth", r"does not fit this MolmoE \(micro\): \d+ adapter tensors missing .*blocks\.2\."),
    ("rank", "tensors differ in shape"),
])
def test_apply_adapter_refuses_an_adapter_that_does_not_fit(tmp_path, source, match):
    if source == "d_model":
        directory = _adapter_for(TINY, tmp_path / "adapter")
    elif source == "depth":
        directory = _adapter_for(replace(MICRO, n_layers=2), tmp_path / "adapter")
    else:  # a config that disagrees with its weights
        directory = _adapter_for(MICRO, tmp_path / "adapter")
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * config["r"]}))
    base = _base()
    before = _logits(base, _token_ids())
    with pytest.raises(ValueError, match=match):
        apply_adapter(base, directory)
    # Nothing half-applied: no adapter layers, the same outputs, the same trainable flags.
    assert not _lora_layers(base) and all(p.requires_grad for p in base.parameters())
    assert torch.equal(_logits(base, _token_ids()), before)


def test_load_model_refuses_an_adapter_trained_on_other_weights(adapted, tmp_path):
    save_flexvlm(_base(), tmp_path / "model.safetensors")
    (tmp_path / "tokenizer.json").write_bytes((assets_dir("micro") / "tokenizer.json").read_bytes())
    directory = save_adapter(add_lora(_base(), SPEC), tmp_path / "adapter", metadata={"base_weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match="was trained on base weights with sha256 000000000000"):
        load_model("micro", weights=tmp_path / "model.safetensors", device="cpu", adapter=directory)


def test_save_adapter_is_atomic_and_never_deletes_foreign_files(tmp_path, monkeypatch):
    peft_model = add_lora(_base(), SPEC)
    directory = save_adapter(peft_model, tmp_path / "adapter")
    first = (directory / "adapter_model.safetensors").read_bytes()

    def crash(save_directory, **kwargs):
        (Path(save_directory) / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft_model, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(peft_model, directory)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(peft_model, tmp_path / "new")
    monkeypatch.undo()
    assert (directory / "adapter_model.safetensors").read_bytes() == first  # the old adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no partial "new", no staging left

    _perturb_(peft_model)
    save_adapter(peft_model, directory)  # replacing an adapter is fine
    assert (directory / "adapter_model.safetensors").read_bytes() != first
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "results.csv").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files that are not an adapter's \(\['results.csv'\]\)"):
        save_adapter(peft_model, tmp_path / "notes")
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_adapter(peft_model, tmp_path / "other", metadata={"when": object()})
    assert not (tmp_path / "other").exists()
    with pytest.raises(TypeError, match="must be the PeftModel that add_lora returned, got MolmoE"):
        save_adapter(_base(), tmp_path / "other")


def test_fused_decode_step_runs_the_unmerged_router_adapter():
    """The fused decode step (CUDA graphs' path; torch references here) calls a LoRA-wrapped router gate as
    a module: its one-launch router reads a plain gate's weight, which would drop the adapter's delta."""
    from flexvlm_env.model.decoder import KVCache
    from flexvlm_env.model.generate import decode_one_token

    peft_model = add_lora(_base(), SPEC)
    _perturb_(peft_model)
    module = peft_model.base_model.model.eval()
    assert type(module.transformer.blocks[0].mlp.gate) is not nn.Linear  # the adapter wraps the gate
    plan, top_k, max_seq, slot = tuple(range(MICRO.n_layers)), (2,) * MICRO.n_layers, 32, 20
    generator = torch.Generator().manual_seed(3)
    keys = [torch.randn(1, MICRO.n_heads, max_seq, MICRO.head_dim, generator=generator) for _ in range(MICRO.n_layers)]
    values = [torch.randn(1, MICRO.n_heads, max_seq, MICRO.head_dim, generator=generator) for _ in range(MICRO.n_layers)]
    logits = {}
    with torch.inference_mode():
        for fused in (False, True):
            cache = KVCache.allocate(MICRO, 1, max_seq, "cpu", torch.float32)
            for i in plan:
                cache.keys[i].copy_(keys[i])
                cache.values[i].copy_(values[i])
            logits[fused] = decode_one_token(module, torch.tensor([[7]]), torch.tensor([slot]), plan, top_k, cache,
                                             slot_range=torch.arange(max_seq), fused=fused, return_logits=True)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unmerged_adapter_on_the_cuda_fast_path(adapted):
    """CUDA graphs and the fused decode kernels call the LoRA layers: unmerged = merged (float32),
    and in bf16 the adapter follows the module's dtype and merged and unmerged runs agree closely."""
    directory, _ = adapted
    sample = generate_samples("tally_qa", "val", n=1)[0]
    config = Config(crops=2, top_k=1, active_blocks=8)
    for dtype in ("float32", "bfloat16"):
        vlms = {merge: load_model("micro", weights="random", device="cuda", dtype=dtype, seed=SEED, adapter=directory, merge_adapter=merge)
                for merge in (True, False)}
        assert vlms[True].use_cuda_graphs and vlms[True].fused_decode and vlms[False].use_cuda_graphs
        assert {p.dtype for name, p in vlms[False].module.named_parameters() if "lora_" in name} == {vlms[False].dtype}
        results = {merge: vlm.generate(sample.image, sample.prompt, config, max_new_tokens=6, ignore_eos=True) for merge, vlm in vlms.items()}
        if dtype == "float32":
            assert results[True].token_ids == results[False].token_ids
        logits = {merge: _sequence_logits(vlm, sample, config, results[True].token_ids) for merge, vlm in vlms.items()}
        tolerance = 1e-3 if dtype == "float32" else 0.15
        torch.testing.assert_close(logits[True].float(), logits[False].float(), rtol=0, atol=tolerance)



def test_finetune_script_resume_equals_uninterrupted_and_writes_a_loadable_adapter(tmp_path):
    """Stopping after 2 of 4 steps and re-running gives the same adapter as 4 straight steps; the
    log has every step once; the adapter names its base and loads through `load_model`."""
    script = load_script("finetune_lora")
    common = dict(batch_size=2, device="cpu", num_workers=0, warmup_steps=1, decay_frac=0.5, log_every=1, rank=2, alpha=4.0,
                  checkpoint_minutes=1e9, lr=1e-2)
    script.main(script.Args(run_dir=str(tmp_path / "straight"), total_steps=4, **common))
    # A first run planned for 4 steps that stops after 2 (as --max-minutes would), then resumes.
    script.main(script.Args(run_dir=str(tmp_path / "resumed"), total_steps=4, **common, max_minutes=1e-9))
    assert not (tmp_path / "resumed" / "adapter").exists()
    script.main(script.Args(run_dir=str(tmp_path / "resumed"), total_steps=4, **common))
    straight = load_file_tensors(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file_tensors(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=1e-6, msg=name)
    assert any(t.abs().max() > 0 for n, t in straight.items() if "lora_B" in n)  # it trained
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    meta = read_adapter_metadata(tmp_path / "straight" / "adapter")
    assert meta["base_weights_sha256"] == json.loads((assets_dir("micro") / "model.json").read_text())["sha256"]
    assert meta["training"]["step"] == 4 and meta["training"]["samples"] == 8 and meta["spec"]["rank"] == 2
    vlm = load_model("micro", device="cpu", adapter=tmp_path / "straight" / "adapter")
    assert vlm.adapter_sha256 is not None and vlm.adapter_merged
    with pytest.raises(ValueError, match="--rank=3 differs"):
        script.main(script.Args(run_dir=str(tmp_path / "resumed"), total_steps=6, **{**common, "rank": 3}))


def load_file_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("kwargs, match", [
    ({"mask_policy": "best"}, "--mask-policy='best' is not valid"),
    ({"total_steps": 0}, "--total-steps=0 must be >= 1"),
    ({"rank": 0}, "rank=0 is not valid"),
    ({"family_weights": (1.0, 2.0)}, "--family-weights has 2 values"),
    ({"anchor_coef": -1.0}, "--anchor-coef=-1.0 must be >= 0"),
])
def test_finetune_script_rejects_bad_arguments(kwargs, match):
    script = load_script("finetune_lora")
    with pytest.raises(ValueError, match=match):
        script.Args(**kwargs)


def test_finetune_batches_follow_the_mask_policy():
    """Reduced-depth draws take the importance plan of the base's ranking (what the runtime runs);
    the full configuration and the "mixed" policy keep the draw's own plan."""
    from flexvlm_env.model.blocks import block_plan
    from flexvlm_env.training import with_mask_policy

    ranking = (0, 5, 10, 8, 11, 12, 15, 2, 9, 7, 13, 6, 1, 3, 4, 14)
    knobs = ElasticKnobs()
    draws = [knobs.draw(1, step) for step in range(200)]
    reduced = [d for d in draws if d.kind != "full"]
    assert reduced and any(d.kind == "full" for d in draws)
    for draw in draws:
        policed = with_mask_policy(draw, "importance", ranking)
        assert (policed.crops, policed.top_k, len(policed.plan), policed.kind) == (draw.crops, draw.top_k, len(draw.plan), draw.kind)
        expected = draw.plan if draw.kind == "full" else block_plan("importance", len(draw.plan), 16, ranking)
        assert policed.plan == expected
        assert with_mask_policy(draw, "mixed", ranking) == draw
    assert with_mask_policy(reduced[0], "random", ranking, seed=3).plan == block_plan("random", len(reduced[0].plan), 16, ranking, 3)
    with pytest.raises(ValueError, match="mask_policy='best' is not valid"):
        with_mask_policy(draws[0], "best", ranking)


def test_finetune_script_full_config_anchor_runs(tmp_path):
    """--anchor-coef adds KL(base || adapted) on full-configuration batches (here every batch)."""
    script = load_script("finetune_lora")
    common = dict(batch_size=2, device="cpu", num_workers=0, warmup_steps=1, log_every=1, rank=2, alpha=4.0, p_full=1.0,
                  total_steps=3, lr=5e-2, checkpoint_minutes=1e9)
    script.main(script.Args(run_dir=str(tmp_path / "anchored"), anchor_coef=10.0, **common))
    script.main(script.Args(run_dir=str(tmp_path / "plain"), **common))
    logs = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()] for name in ("anchored", "plain")}
    assert [r["step"] for r in logs["anchored"]] == [1, 2, 3] and "ce/full" in logs["anchored"][0]
    # Step 1 starts from B = 0: adapted = base, so the KL and its gradient are zero and steps 1-2
    # match the plain run; once the adapter has moved, the anchor pulls step 3 elsewhere.
    # (Equal up to float32 noise: the anchored step's backward sums its zero KL gradient through other
    # kernels, which on some CPUs (an Intel Xeon here) moves step 2's loss by ~1e-5 relative.)
    for step in (0, 1):
        assert logs["anchored"][step]["ce/full"] == pytest.approx(logs["plain"][step]["ce/full"], rel=1e-4)
    assert logs["anchored"][2]["ce/full"] != pytest.approx(logs["plain"][2]["ce/full"], rel=1e-2)
    # The anchor's KL is logged: zero while the adapter is still the identity, positive once it moved.
    assert logs["anchored"][0]["anchor_kl/full"] == pytest.approx(0.0, abs=1e-6)
    assert logs["anchored"][2]["anchor_kl/full"] > 0
    assert not any("anchor_kl/full" in record for record in logs["plain"])
