"""Training micro at another crop size (train_micro.py --crop-px): the ViT position table is
resampled, every other tensor carries over, and the result loads and answers through the runtime."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import load_script
from flexvlm_env import Config, load_model
from flexvlm_env.model.args import preset_args
from flexvlm_env.model.checkpoint import save_flexvlm
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.runtime import assets_dir
from flexvlm_env.training import load_training_state
from flexvlm_env.training.geometry import load_across_crop_size_, resample_positions

SHIPPED = assets_dir("micro") / "model.safetensors"
script = load_script("train_micro")


def test_resample_positions_keeps_class_row_and_smooth_grids():
    table = torch.randn(1 + 8 * 8, 4)
    assert torch.equal(resample_positions(table, 8), table)
    out = resample_positions(table, 16)
    assert out.shape == (1 + 16 * 16, 4) and torch.equal(out[0], table[0])
    constant = torch.cat([torch.zeros(1, 4), torch.full((64, 4), 0.5)])
    torch.testing.assert_close(resample_positions(constant, 16)[1:], torch.full((256, 4), 0.5))
    # A left-to-right ramp stays a ramp: each row of the new grid increases along the columns.
    ramp = torch.cat([torch.zeros(1, 1), torch.arange(8.0).repeat(8)[:, None]])
    grid = resample_positions(ramp, 16)[1:].reshape(16, 16)
    assert bool((grid[:, 1:] > grid[:, :-1]).all())
    with pytest.raises(ValueError, match="not 1 \\+ a square grid"):
        resample_positions(torch.zeros(11, 4), 4)


def test_load_across_crop_size_changes_only_the_position_table():
    model = MolmoE(script.micro_args(112))  # the shipped micro has 224-px crops (16 x 16 patches)
    resampled = load_across_crop_size_(model, SHIPPED)
    assert resampled == ["model.vision_backbone.image_vit.positional_embedding"]
    shipped = load_model("micro").module
    for (name, p), q in zip(model.named_parameters(), shipped.parameters()):
        if name in resampled:
            assert p.shape == (1 + 8 * 8, 64) and torch.equal(p[0], q[0].to(p.dtype))
        else:
            assert torch.equal(p, q.to(p.dtype)), name
    other = preset_args("micro")
    with pytest.raises(ValueError, match="another model than the one being trained"):
        load_across_crop_size_(MolmoE(type(other).from_dict({**other.to_dict(), "d_model": 64})), SHIPPED)


def test_train_script_at_224_px_from_the_shipped_weights_resumes_and_loads(tmp_path):
    common = dict(run_dir=str(tmp_path / "run"), batch_size=2, device="cpu", num_workers=0, finalize=False, seed=7,
                  lr=1e-9, crop_px=224, init_from=str(SHIPPED), log_every=1)
    script.main(script.Args(total_steps=1, **common))
    trained = MolmoE(script.micro_args(224))
    assert load_training_state(tmp_path / "run" / "checkpoint", trained, None)["step"] == 1
    shipped = dict(load_model("micro").module.named_parameters())
    for name, p in trained.named_parameters():  # lr 1e-9: one step leaves the carried weights in place
        if not name.endswith("positional_embedding"):
            torch.testing.assert_close(p, shipped[name].to(p.dtype), rtol=0, atol=1e-6, msg=name)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1
    with pytest.raises(ValueError, match="--crop-px=112 differs"):
        script.main(script.Args(total_steps=2, **{**common, "crop_px": 112}))
    # The weights load through the runtime with their own geometry and answer a request.
    path = tmp_path / "micro224.safetensors"
    save_flexvlm(trained.to(torch.bfloat16), path)
    vlm = load_model("micro", weights=str(path))
    assert vlm.args.vision.crop_px == 224
    result = vlm.generate(Image.new("RGB", (320, 240), (90, 140, 200)), "What colour is the sky?",
                          config=Config(crops=2, top_k=8, active_blocks=16), max_new_tokens=3)
    assert isinstance(result.text, str) and result.tokens.output >= 1


def test_train_script_rejects_a_crop_size_off_the_pooled_patch_grid():
    with pytest.raises(ValueError, match="--crop-px=126 is not valid"):
        script.Args(crop_px=126)
