"""Runtime behaviour on a tiny random-weight MolmoE: equivalences, knobs, token layout, timing, errors."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flexvlm_env import Config, load_model
from flexvlm_env.model.args import PRESETS
from flexvlm_env.model.generate import embed_inputs
from flexvlm_env.model.preprocess import select_tiling_exact, to_rgb_array, token_layout, vision_token_count
from flexvlm_env.model.runtime import VLM

from conftest import TINY, make_tiny_vlm


def _image(width=400, height=300, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _full_logits(vlm: VLM, image, prompt, config, extra_tokens):
    """Logits of every position from a full recompute (no KV cache) over prompt + extra tokens."""
    request = vlm.prepare(image, prompt, config)
    ids = torch.cat([request.input_ids, torch.tensor(extra_tokens, dtype=torch.long)])[None]
    features = idx = None
    if request.image is not None:
        features = vlm.module.vision_backbone.project(vlm.encode_image(request.image))
        idx = request.image.image_input_idx
    embeds = embed_inputs(vlm.module, ids, features, idx)
    hidden = vlm.module.transformer(embeds, torch.arange(ids.shape[1])[None], vlm.plan(config), config.top_k_per_block(vlm.args.n_layers))
    return vlm.module.lm_head(hidden)[0], request.input_ids.shape[0]


@pytest.mark.parametrize("config", [Config(crops=4, top_k=2, active_blocks=4), Config(crops=2, top_k=1, active_blocks=2)])
def test_kv_cache_generation_equals_full_recompute(tiny_vlm, config):
    image = _image()
    result = tiny_vlm.generate(image, "What is in the picture?", config, max_new_tokens=6, ignore_eos=True)
    with torch.inference_mode():
        logits, length = _full_logits(tiny_vlm, image, "What is in the picture?", config, result.token_ids[:-1])
    recomputed = logits[length - 1 :].argmax(-1).tolist()
    assert recomputed == result.token_ids


def test_kv_cache_logits_match_recompute(tiny_vlm):
    config = Config(crops=3, top_k=2, active_blocks=3)
    image = _image(seed=3)
    result = tiny_vlm.generate(image, "Count the shapes.", config, max_new_tokens=4, ignore_eos=True)
    cache = tiny_vlm._cache
    with torch.inference_mode():
        logits, length = _full_logits(tiny_vlm, image, "Count the shapes.", config, result.token_ids[:-1])
        # Decode one more step against the cache and compare its logits with the recompute's last row.
        from flexvlm_env.model.generate import decode_one_token  # noqa: F401  (the path under test)

        token = torch.tensor([[result.token_ids[-2]]])
        slot = torch.tensor([length + len(result.token_ids) - 2])
        embeds = tiny_vlm.module.transformer.wte(token)
        mask = (torch.arange(cache.max_seq) <= slot)[None, None, None, :]
        hidden = tiny_vlm.module.transformer(embeds, slot[None], tiny_vlm.plan(config), config.top_k_per_block(4), cache=cache, cache_index=slot, mask=mask, attend_cache=True)
        step_logits = tiny_vlm.module.lm_head(hidden)[0, -1]
    torch.testing.assert_close(step_logits, logits[-1], atol=1e-4, rtol=1e-4)


def _expert(mlp, e, h):
    hidden = mlp.w_down.shape[2]
    gate_up = h @ mlp.w_gate_up[e].t()
    return (F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]) @ mlp.w_down[e].t()


def test_top_k_all_experts_is_the_dense_mixture(tiny_vlm):
    mlp = tiny_vlm.module.transformer.blocks[1].mlp
    x = torch.randn(1, 7, TINY.d_model)
    with torch.inference_mode():
        got = mlp(x, top_k=TINY.n_experts)
        h = mlp.ff_norm(x)[0]
        probs = torch.softmax(mlp.gate(h), -1)
        dense = sum(probs[:, e : e + 1] * _expert(mlp, e, h) for e in range(TINY.n_experts))
    torch.testing.assert_close(got[0], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_lower_top_k_keeps_largest_probabilities_unrenormalised(tiny_vlm, top_k):
    mlp = tiny_vlm.module.transformer.blocks[2].mlp
    x = torch.randn(1, 5, TINY.d_model)
    with torch.inference_mode():
        got = mlp(x, top_k=top_k)[0]
        h = mlp.ff_norm(x)[0]
        probs = torch.softmax(mlp.gate(h), -1)
        expected = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for e in torch.argsort(probs[t], descending=True)[:top_k].tolist():
                expected[t] += probs[t, e] * _expert(mlp, e, h[t : t + 1])[0]
        # The kept probabilities are used as they are: they sum to less than 1.
        assert float(probs.topk(top_k, -1).values.sum(-1).max()) < 1.0 or top_k == TINY.n_experts
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_skipped_block_equals_model_without_it(tiny_vlm):
    skipped = 2
    vlm = make_tiny_vlm(block_ranking=(0, 1, 3, 2))  # least important block: 2
    config = Config(crops=2, top_k=2, active_blocks=3)
    assert vlm.plan(config) == (0, 1, 3)
    result = vlm.generate(_image(seed=1), "Describe.", config, max_new_tokens=5, ignore_eos=True)

    from dataclasses import replace

    from flexvlm_env.model.molmoe import MolmoE

    args = replace(TINY, n_layers=3)
    smaller = MolmoE(args)
    prefix = "model.transformer.blocks."
    state = {k: v for k, v in vlm.module.state_dict().items() if not k.startswith(f"{prefix}{skipped}.")}
    renamed = {k.replace(f"{prefix}3.", f"{prefix}2."): v for k, v in state.items()}
    smaller.load_state_dict(renamed, strict=True)
    reference = VLM(smaller, vlm.tokenizer)
    expected = reference.generate(_image(seed=1), "Describe.", Config(crops=2, top_k=2, active_blocks=3), max_new_tokens=5, ignore_eos=True)
    assert result.token_ids == expected.token_ids


def test_plan_is_fixed_across_decode_steps(tiny_vlm):
    calls = {i: 0 for i in range(TINY.n_layers)}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(tiny_vlm.module.transformer.blocks)]
    try:
        config = Config(crops=1, top_k=1, active_blocks=2, mask_policy="prefix")
        result = tiny_vlm.generate(_image(), "Hi", config, max_new_tokens=5, ignore_eos=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.plan == (0, 1)
    steps = len(result.token_ids)  # one prefill + (n-1) decode steps
    assert calls == {0: steps, 1: steps, 2: 0, 3: 0}


def test_mask_policies():
    vlm = make_tiny_vlm(block_ranking=(0, 3, 1, 2))
    assert vlm.plan(Config(active_blocks=2, top_k=2, mask_policy="importance")) == (0, 3)
    assert vlm.plan(Config(active_blocks=2, top_k=2, mask_policy="prefix")) == (0, 1)
    random_plan = vlm.plan(Config(active_blocks=3, top_k=2, mask_policy="random", mask_seed=5))
    assert random_plan[0] == 0 and len(random_plan) == 3
    assert random_plan == vlm.plan(Config(active_blocks=3, top_k=2, mask_policy="random", mask_seed=5))
    assert vlm.plan(Config(active_blocks=4, top_k=2)) == (0, 1, 2, 3)


@pytest.mark.parametrize("size", [(336, 336), (640, 480), (1024, 768), (300, 900), (200, 1200), (1600, 400)])
@pytest.mark.parametrize("crops", [1, 2, 3, 4, 6, 9, 12])
def test_vision_token_counts_follow_the_layout(tiny_vlm, size, crops):
    request = tiny_vlm.prepare(Image.new("RGB", size, (10, 20, 30)), "q", Config(crops=crops, top_k=2, active_blocks=4))
    rows, cols = request.image.tiling
    assert rows * cols == crops  # the exact rule tiles into exactly `crops` crops
    # MolmoE layout: 144 global cells + (8*rows + 4) x (8*cols + 4) tile cells.
    assert request.image.vision_tokens == 144 + (8 * rows + 4) * (8 * cols + 4) == vision_token_count(rows, cols, TINY.vision)
    assert request.image.n_crops == crops + 1
    # Aspect: a wide image never gets more rows than columns (and vice versa).
    width, height = size
    if width > 1.5 * height and crops in (2, 4, 6, 9, 12):
        assert cols >= rows
    if height > 1.5 * width and crops in (2, 4, 6, 12):
        assert rows >= cols


def test_native_rule_treats_crops_as_upper_bound(tiny_vlm):
    request = tiny_vlm.prepare(Image.new("RGB", (336, 336)), "q", Config(crops=12, crop_rule="native", top_k=2, active_blocks=4))
    assert request.image.tiling == (1, 1)
    request = tiny_vlm.prepare(Image.new("RGB", (1024, 768)), "q", Config(crops=12, crop_rule="native", top_k=2, active_blocks=4))
    assert request.image.tiling == (3, 4)


def test_micro_preset_keeps_the_topology():
    micro, real = PRESETS["micro"], PRESETS["molmoe-1b"]
    for name in ("n_layers", "n_experts", "top_k", "max_crops"):
        assert getattr(micro, name) == getattr(real, name)
    assert micro.vision.pool == real.vision.pool == 2
    assert select_tiling_exact(480, 640, 12, micro.vision) == select_tiling_exact(480, 640, 12, real.vision) == (3, 4)


def test_stage_timing_adds_up_and_does_not_change_outputs(tiny_vlm):
    config = Config(crops=4, top_k=2, active_blocks=4)
    image = _image(seed=7)
    timed = tiny_vlm.generate(image, "Describe the image.", config, max_new_tokens=6, ignore_eos=True)
    untimed = tiny_vlm.generate(image, "Describe the image.", config, max_new_tokens=6, ignore_eos=True, timing=False)
    assert timed.token_ids == untimed.token_ids
    lat = timed.latency
    assert len(lat.decode_ms_per_token) == len(timed.token_ids) - 1
    assert lat.decode_ms == pytest.approx(sum(lat.decode_ms_per_token))
    assert all(v > 0 for v in (lat.vision_encoder_ms, lat.projector_ms, lat.prefill_ms, lat.decode_ms))
    assert abs(lat.stage_sum_ms - lat.total_ms) <= 0.02 * lat.total_ms
    assert timed.tokens.output == 6 and timed.tokens.vision == 144 + 20 * 20


def test_eos_stops_generation():
    vlm = make_tiny_vlm()
    eos = vlm.special.eos

    class AlwaysEos(torch.nn.Module):
        def forward(self, hidden):
            logits = torch.zeros(*hidden.shape[:-1], TINY.embedding_size)
            logits[..., eos] = 1.0
            return logits

    vlm.module.lm_head = AlwaysEos()
    result = vlm.generate(_image(), "Hi", Config(crops=1, top_k=2, active_blocks=4), max_new_tokens=10)
    assert result.token_ids == [eos] and result.text == "" and result.latency.decode_ms_per_token == []
    forced = vlm.generate(_image(), "Hi", Config(crops=1, top_k=2, active_blocks=4), max_new_tokens=4, ignore_eos=True)
    assert forced.token_ids == [eos] * 4
    batched = vlm.generate_batch([_image(), None], ["Hi", "Hello there"], Config(crops=1, top_k=2, active_blocks=4), max_new_tokens=6)
    assert [b.token_ids for b in batched] == [[eos], [eos]]


def test_batch_equals_one_at_a_time(tiny_vlm):
    config = Config(crops=2, top_k=2, active_blocks=3)
    images = [_image(seed=s, width=300 + 50 * s) for s in range(3)] + [None]
    prompts = ["What colour is the big square?", "Count.", "Read the word on the sign, please.", "No image here."]
    batched = tiny_vlm.generate_batch(images, prompts, config, max_new_tokens=5)
    single = [tiny_vlm.generate(i, p, config, max_new_tokens=5) for i, p in zip(images, prompts)]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [b.tokens for b in batched] == [s.tokens for s in single]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crops=0), "crops=0"),
        (dict(top_k=0), "top_k=0"),
        (dict(active_blocks=-1), "active_blocks=-1"),
        (dict(crops=2.5), "crops=2.5"),
        (dict(mask_policy="best"), "mask_policy='best'"),
        (dict(crop_rule="any"), "crop_rule='any'"),
        (dict(top_k=()), "top_k"),
        (dict(crops=np.float32(2.0)), "must be an int (got float32)"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        Config(**kwargs)


@pytest.mark.parametrize(
    "config, match",
    [
        (Config(crops=13, top_k=2, active_blocks=4), r"crops=13 is out of range; allowed: 1\.\.12"),
        (Config(crops=1, top_k=9, active_blocks=4), r"top_k=9 is out of range; allowed: 1\.\.8"),
        (Config(crops=1, top_k=2, active_blocks=5), r"active_blocks=5 is out of range; allowed: 1\.\.4"),
        (Config(crops=1, top_k=(2, 2, 2), active_blocks=4), "top_k has 3 values but the model has 4 blocks"),
        (Config(crops=1, top_k=(2, 9, 2, 2), active_blocks=4), r"top_k\[1\]=9"),
    ],
)
def test_config_checked_against_the_model(tiny_vlm, config, match):
    with pytest.raises(ValueError, match=match):
        tiny_vlm.generate(_image(), "q", config, max_new_tokens=2)


def test_per_block_top_k_vector(tiny_vlm):
    result = tiny_vlm.generate(_image(), "q", Config(crops=1, top_k=(1, 2, 8, 3), active_blocks=4), max_new_tokens=2)
    assert len(result.token_ids) >= 1


@pytest.mark.parametrize(
    "image, match",
    [
        (Image.new("RGB", (0, 10)), "zero size"),
        (b"definitely not an image", "could not decode"),
        (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
        (Image.new("F", (20, 20)), "mode 'F'"),
        ("picture.png", "must be a PIL.Image"),
    ],
)
def test_bad_images(tiny_vlm, image, match):
    with pytest.raises(ValueError, match=match):
        tiny_vlm.generate(image, "q", Config(crops=1, top_k=2, active_blocks=4), max_new_tokens=2)


def test_encoded_bytes_and_arrays_are_accepted(tiny_vlm):
    image = _image()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    config = Config(crops=1, top_k=2, active_blocks=4)
    a = tiny_vlm.generate(image, "q", config, max_new_tokens=3, ignore_eos=True)
    b = tiny_vlm.generate(buffer.getvalue(), "q", config, max_new_tokens=3, ignore_eos=True)
    c = tiny_vlm.generate(np.asarray(image), "q", config, max_new_tokens=3, ignore_eos=True)
    assert a.token_ids == b.token_ids == c.token_ids


def test_rgb_images_are_read_as_converted_ones_and_inputs_are_left_alone():
    rgb = _image()
    for image in (rgb, rgb.convert("RGBA"), rgb.convert("L")):
        expected = np.array(image.convert("RGB"), dtype=np.uint8)
        array = to_rgb_array(image)
        assert array.dtype == np.uint8 and array.flags.writeable and np.array_equal(array, expected)
    # A caller's array is read in place, never written (on the CPU the pixels tensor shares its memory).
    pixels = np.asarray(rgb).copy()
    before = pixels.copy()
    tiny_vlm = make_tiny_vlm()
    tiny_vlm.generate(pixels, "q", Config(crops=2, top_k=2, active_blocks=4), max_new_tokens=2)
    assert np.array_equal(pixels, before)


def test_token_layout_is_memoised_but_returns_fresh_copies():
    vlm = make_tiny_vlm()
    vision, special = vlm.args.vision, vlm.special
    tokens, idx = token_layout(2, 3, vision, special, 1)
    expected_tokens, expected_idx = list(tokens), idx.clone()
    tokens.append(-5)
    idx.fill_(7)  # a caller changing its copy must not change the next request's layout
    again_tokens, again_idx = token_layout(2, 3, vision, special, 1)
    assert again_tokens == expected_tokens and torch.equal(again_idx, expected_idx)
    other_tokens, other_idx = token_layout(2, 3, vision, special, 5)  # another offset: positions shift by 4
    assert other_tokens == expected_tokens
    assert torch.equal(other_idx[other_idx >= 0], expected_idx[expected_idx >= 0] + 4)


def test_bad_generate_arguments(tiny_vlm):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        tiny_vlm.generate(None, "q", Config(crops=1, top_k=2, active_blocks=4), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt must be a str"):
        tiny_vlm.generate(None, 42, Config(crops=1, top_k=2, active_blocks=4))
    with pytest.raises(ValueError, match="config must be a flexvlm_env.Config"):
        tiny_vlm.generate(None, "q", (12, 8, 16))


def test_numpy_integers_are_knob_values(tiny_vlm):
    """Controllers emit NumPy integers: a Config made of them is the Config of the same Python ints."""
    config = Config(crops=np.int64(2), top_k=(np.int32(2),) * 4, active_blocks=np.int64(3), mask_seed=np.int64(1))
    assert config == Config(crops=2, top_k=(2, 2, 2, 2), active_blocks=3, mask_seed=1)
    assert type(config.crops) is int and all(type(k) is int for k in config.top_k)
    one = tiny_vlm.generate(None, "q", config, max_new_tokens=np.int64(2), ignore_eos=True)
    (batch,) = tiny_vlm.generate_batch([None], ["q"], config, max_new_tokens=np.int64(2))
    assert len(one.token_ids) == 2 and len(batch.token_ids) <= 2
    with pytest.raises(ValueError, match="max_new_tokens=True"):
        tiny_vlm.generate_batch([None], ["q"], config, max_new_tokens=True)


def test_an_elongated_image_keeps_a_one_pixel_strip(tiny_vlm):
    for size in ((4000, 10), (10, 4000)):
        result = tiny_vlm.generate(Image.new("RGB", size), "q", Config(crops=2, top_k=2, active_blocks=4), max_new_tokens=2)
        assert result.tokens.vision > 0


def test_a_checkpoint_directory_is_the_file_it_holds(tmp_path):
    """weights=<dir holding model.safetensors> reads the file's metadata (block ranking) and hash as weights=<file> does."""
    from flexvlm_env.model.checkpoint import save_flexvlm

    vlm = make_tiny_vlm(seed=5)
    save_flexvlm(vlm.module, tmp_path / "model.safetensors", {"block_ranking": "[0, 2, 1, 3]"})
    (tmp_path / "tokenizer.json.gz").write_bytes((vlm_tokenizer_path()).read_bytes())
    by_file = load_model("micro", weights=tmp_path / "model.safetensors", device="cpu")
    by_dir = load_model("micro", weights=tmp_path, device="cpu")
    assert by_dir.block_ranking == by_file.block_ranking == (0, 2, 1, 3)
    assert by_dir.weights_sha256 == by_file.weights_sha256 and len(by_dir.weights_sha256) == 64
    assert by_dir.plan(Config(crops=2, top_k=2, active_blocks=2)) == by_file.plan(Config(crops=2, top_k=2, active_blocks=2))


def test_weights_of_another_preset_and_bad_checkpoints_are_refused_before_allocation(tmp_path, monkeypatch):
    import shutil

    from flexvlm_env.model.runtime import assets_dir

    micro = tmp_path / "micro"
    micro.mkdir()
    shutil.copy(assets_dir("micro") / "model.safetensors", micro / "model.safetensors")
    with pytest.raises(ValueError, match=r"holds a 'micro' model \(its metadata\); pass preset='micro', not 'molmoe-1b'"):
        load_model("molmoe-1b", weights=micro, device="cpu")
    # a checkpoint with the wrong tensors fails on its names, before the (7B-parameter) model is allocated
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    allocated = []
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: allocated.append(1) or self)
    with pytest.raises(ValueError, match=r"does not match the architecture: \d+ missing"):
        load_model("molmoe-1b", weights=tmp_path / "foo.safetensors", device="cpu", dtype="bfloat16")
    assert not allocated
    (tmp_path / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"corrupt.safetensors is not a readable safetensors file"):
        load_model("molmoe-1b", weights=tmp_path / "corrupt.safetensors", device="cpu")


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="preset='big'"):
        load_model("big")
    with pytest.raises(ValueError, match="has no bundled weights"):
        load_model("molmoe-1b", device="cpu")
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_model("micro", weights="random", device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("micro", weights="random", device="cuda")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_model("molmoe-1b", weights=tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub id"):
        load_model("molmoe-1b", weights=str(tmp_path / "missing" / "dir"), device="cpu")
    # a mistyped relative file path is not a hub id (no download is tried)
    with pytest.raises(FileNotFoundError, match=r"weights='runs/model.safetensors' is neither an existing path"):
        load_model("micro", weights="runs/model.safetensors", device="cpu")
    for kwargs, match in [({"device": "meta"}, r"device='meta' is not supported; allowed: 'cpu', 'cuda'"),
                          ({"seed": "a"}, r"seed='a' must be an int"), ({"max_seq_len": 0}, r"max_seq_len=0 must be an int >= 1"),
                          ({"weights": 3}, r"weights=3 must be a path")]:
        with pytest.raises(ValueError, match=match):
            load_model("micro", **{"weights": "random", "device": "cpu", **kwargs})
    adapter_file = tmp_path / "adapter.safetensors"
    adapter_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter=.*adapter.safetensors' is a file; pass the adapter's directory"):
        load_model("micro", weights="random", device="cpu", adapter=adapter_file)


def test_random_weights_are_flagged_and_reproducible():
    a = load_model("micro", weights="random", device="cpu", seed=3)
    b = load_model("micro", weights="random", device="cpu", seed=3)
    assert a.random_weights and a.weights_sha256 is None
    for (name, pa), (_, pb) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert torch.equal(pa, pb), name


def test_hub_id_downloads_only_config_weights_and_tokenizer(monkeypatch, tmp_path):
    import huggingface_hub

    from flexvlm_env.model.checkpoint import resolve_checkpoint

    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint("allenai/MolmoE-1B-0924") == tmp_path
    assert calls["repo_id"] == "allenai/MolmoE-1B-0924"
    # Never remote code or pickles: only config, safetensors and the tokenizer are fetched.
    assert not any(p.endswith((".py", ".bin", ".pt")) for p in calls["allow_patterns"])
    assert "*.safetensors" in calls["allow_patterns"] and "tokenizer.json" in calls["allow_patterns"]


def test_a_hub_download_that_fails_names_the_weights(monkeypatch):
    import huggingface_hub

    from flexvlm_env.model.checkpoint import resolve_checkpoint

    def offline(repo_id, allow_patterns):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"weights='allenai/MolmoE-1B-0924' is not an existing path, and downloading "
                                                r"it as a hub id failed \(LocalEntryNotFoundError"):
        resolve_checkpoint("allenai/MolmoE-1B-0924")


def test_flexvlm_checkpoint_roundtrip(tmp_path):
    from flexvlm_env.model.checkpoint import save_flexvlm

    vlm = make_tiny_vlm(seed=5)
    save_flexvlm(vlm.module, tmp_path / "model.safetensors", {"block_ranking": "[0, 2, 1, 3]"})
    (tmp_path / "tokenizer.json.gz").write_bytes((vlm_tokenizer_path()).read_bytes())
    loaded = load_model("micro", weights=tmp_path / "model.safetensors", device="cpu")
    assert loaded.args == vlm.args and loaded.block_ranking == (0, 2, 1, 3) and not loaded.random_weights
    assert len(loaded.weights_sha256) == 64
    config = Config(crops=2, top_k=2, active_blocks=4)
    assert loaded.generate(_image(), "q", config, max_new_tokens=4, ignore_eos=True).token_ids == vlm.generate(_image(), "q", config, max_new_tokens=4, ignore_eos=True).token_ids


def test_renormalising_router_known_values():
    """`norm_topk_prob` (the router ablation) scales the kept weights to sum to 1: top-1 keeps the
    heaviest expert at weight 1, and at top_k = n_experts nothing is dropped, so the model computes
    exactly what MolmoE's router does (which micro keeps by default, as old exports load)."""
    molmoe = make_tiny_vlm(seed=3)
    renormalising = make_tiny_vlm(seed=3, args=dataclasses.replace(TINY, norm_topk_prob=True))
    assert not molmoe.args.norm_topk_prob and not PRESETS["micro"].norm_topk_prob
    assert not type(TINY).from_dict({k: v for k, v in TINY.to_dict().items() if k != "norm_topk_prob"}).norm_topk_prob
    h = torch.randn(6, TINY.d_model, generator=torch.Generator().manual_seed(0))
    plain, renormalised = molmoe.module.transformer.blocks[1].mlp, renormalising.module.transformer.blocks[1].mlp
    for top_k in (1, 3, TINY.n_experts):
        (w, ids), (w_norm, ids_norm) = plain.route(h, top_k), renormalised.route(h, top_k)
        assert torch.equal(ids, ids_norm) and bool((w.sum(-1) < 1 + 1e-6).all())
        torch.testing.assert_close(w_norm, w / w.sum(-1, keepdim=True))
        torch.testing.assert_close(w_norm.sum(-1), torch.ones(6))
    full = Config(crops=2, top_k=TINY.n_experts, active_blocks=TINY.n_layers)
    answers = [vlm.generate(_image(seed=4), "What is it?", full, max_new_tokens=5, ignore_eos=True).token_ids
               for vlm in (molmoe, renormalising)]
    assert answers[0] == answers[1]


def vlm_tokenizer_path():
    from flexvlm_env.model.runtime import assets_dir

    return assets_dir("molmoe-1b") / "tokenizer.json.gz"


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("config", [Config(crops=2, top_k=2, active_blocks=4), Config(crops=1, top_k=(1, 3, 8, 2), active_blocks=3)])
def test_fused_decode_step_equals_plain_step(tiny_vlm, config, norm_topk_prob):
    """The decode path used inside CUDA graphs (fused residual+norm, q/k norm+RoPE+KV write, router)
    computes what Transformer.forward computes for one token (here with the torch references), with
    MolmoE's router and with the renormalising one of the router ablation."""
    from flexvlm_env.model.decoder import KVCache

    if norm_topk_prob:
        tiny_vlm = make_tiny_vlm(args=dataclasses.replace(TINY, norm_topk_prob=True))
    from flexvlm_env.model.generate import decode_one_token

    result = tiny_vlm.generate(_image(seed=2), "Read it.", config, max_new_tokens=3, ignore_eos=True)
    length = result.tokens.input
    plan, top_k = tiny_vlm.plan(config), config.top_k_per_block(TINY.n_layers)
    with torch.inference_mode():
        caches = []
        for _ in range(2):
            cache = KVCache.allocate(TINY, 1, 64 + length, "cpu", torch.float32)
            for i in range(TINY.n_layers):
                cache.keys[i].copy_(tiny_vlm._cache.keys[i][:, :, : 64 + length])
                cache.values[i].copy_(tiny_vlm._cache.values[i][:, :, : 64 + length])
            caches.append(cache)
        token, slot = torch.tensor([[result.token_ids[-1]]]), torch.tensor([length + 2])
        slot_range = torch.arange(64 + length)
        # The logits: the fused path forms them in `decode_gemv` with ln_f inside, not by the lm_head module.
        logits = {fused: decode_one_token(tiny_vlm.module, token, slot, plan, top_k, cache, slot_range=slot_range,
                                          fused=fused, return_logits=True)
                  for fused, cache in zip((False, True), caches)}
        torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="history needs fused"):
            decode_one_token(tiny_vlm.module, token, slot, plan, top_k, caches[0], slot_range=slot_range,
                             history=torch.zeros(128, dtype=torch.long))
        for i in plan:
            torch.testing.assert_close(caches[1].keys[i], caches[0].keys[i], atol=1e-5, rtol=1e-5)
            # After block 0 the values carry the earlier blocks' rounding (another op order in the fused
            # path): a few float32 ulps, which depend on the CPU's BLAS kernels.
            torch.testing.assert_close(caches[1].values[i], caches[0].values[i], atol=1e-6, rtol=1e-5)



def test_molmoe_checkpoint_without_tokenizer_uses_the_shipped_molmoe_tokenizer(tmp_path):
    from flexvlm_env.model.checkpoint import official_names
    from flexvlm_env.model.molmoe import MolmoE
    from safetensors.torch import save_file

    from flexvlm_env.model.args import args_from_molmo_config

    import json

    config = {
        "d_model": 32, "n_heads": 4, "n_layers": 2, "moe_num_experts": 4, "moe_top_k": 2, "mlp_ratio": 1,
        "vocab_size": 50280, "embedding_size": 50304, "additional_vocab_size": 128, "max_sequence_length": 4096,
        "vision_backbone": {"image_emb_dim": 24, "image_num_layers": 3, "image_num_heads": 2, "image_head_dim": 12,
                            "image_mlp_dim": 48, "image_default_input_size": [336, 336], "image_patch_size": 14},
        "vit_layers": [-1, -3],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = args_from_molmo_config(config)
    module = MolmoE(args).init_random_(0)
    tensors = {}
    params = dict(module.named_parameters())
    for name in official_names(args):
        if ".experts." in name:
            block, expert, proj = name.split(".")[3], int(name.split(".")[6]), name.split(".")[7]
            mlp = f"model.transformer.blocks.{block}.mlp"
            h = args.expert_hidden
            tensor = {"gate_proj": params[f"{mlp}.w_gate_up"][expert, :h], "up_proj": params[f"{mlp}.w_gate_up"][expert, h:],
                      "down_proj": params[f"{mlp}.w_down"][expert]}[proj]
        else:
            tensor = params[name]
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    vlm = load_model("molmoe-1b", weights=tmp_path, device="cpu")
    assert vlm.tokenizer.special.im_patch == 50282 and vlm.args.n_layers == 2
    for name, param in vlm.module.named_parameters():  # official names and stacked experts round-trip
        assert torch.equal(param, params[name]), name


def test_deepcopy_shares_the_loaded_model(tiny_vlm):
    # Gymnasium deep-copies env kwargs (env.spec.make(), check_env); a VLM there must be shared,
    # since its CUDA graphs cannot be copied and a copy would duplicate the weights.
    import copy

    kwargs = copy.deepcopy({"vlm": tiny_vlm, "families": ["tally_qa"]})
    assert kwargs["vlm"] is tiny_vlm


def test_block_plan_memo_follows_the_ranking_and_policy():
    vlm = make_tiny_vlm(seed=5)
    n = vlm.args.n_layers
    first = vlm.plan(Config(active_blocks=2))
    assert vlm.plan(Config(active_blocks=2)) is first  # memoised
    vlm.block_ranking = (0, *reversed(range(1, n)))  # a re-measured ranking: no stale plan
    assert vlm.plan(Config(active_blocks=2)) == (0, n - 1)
    assert vlm.plan(Config(active_blocks=2, mask_policy="prefix")) == (0, 1)
    seeds = {vlm.plan(Config(active_blocks=2, mask_policy="random", mask_seed=s)) for s in range(8)}
    assert len(seeds) > 1
