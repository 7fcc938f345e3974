"""Reading pretraining of micro's vision tower (flexvlm_env.training.reading, scripts/pretrain_reader.py)
and the reading check (scripts/reading_check.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_script
from flexvlm_env.model.checkpoint import read_metadata
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.runtime import assets_dir, load_model
from flexvlm_env.training import load_training_state, micro_args
from flexvlm_env.training.reading import (
    CHARACTERS, END, MAX_CHARACTERS, ReadingCropStream, ReadingHead, character_targets, reading_crop,
)

pretrain = load_script("pretrain_reader")
check = load_script("reading_check")


def test_character_targets_known_values_and_bad_characters():
    targets = character_targets(["ab9", ""])
    assert targets.shape == (2, MAX_CHARACTERS)
    assert targets[0, :4].tolist() == [0, 1, CHARACTERS.index("9"), END] and (targets[1] == END).all()
    assert character_targets(["x" * 20])[0].tolist() == [CHARACTERS.index("x")] * MAX_CHARACTERS  # cut, not refused
    assert character_targets(["420.20"])[0, :7].tolist() == [CHARACTERS.index(c) for c in "420.20"] + [END]
    with pytest.raises(ValueError, match="answer 'a b' has ' '"):
        character_targets(["a b"])


def test_reading_crops_are_deterministic_legible_and_resume_in_step_order():
    pixels, answer = reading_crop(5, 0, 112, (20, 40))
    again, same = reading_crop(5, 0, 112, (20, 40))
    assert np.array_equal(pixels, again) and answer == same and pixels.shape == (112, 112, 3)
    assert np.abs(pixels.astype(int) - np.median(pixels.reshape(-1, 3), axis=0)).max() > 60  # ink on the background
    stream = ReadingCropStream(3, 0, 112, (20, 40))
    batches = iter(stream)
    first, second = next(batches), next(batches)
    resumed = next(iter(ReadingCropStream(3, 0, 112, (20, 40), start_step=1)))
    assert first["step"] == 0 and second["step"] == 1 and torch.equal(second["pixels"], resumed["pixels"])
    assert torch.equal(first["targets"][2], character_targets([reading_crop(2, 0, 112, (20, 40))[1]])[0])


def test_reading_head_orders_characters_from_cell_positions():
    """The same feature at two cells must be readable as two different characters: only the cell
    embedding tells them apart, so fitting this shows the head can order what it reads."""
    torch.manual_seed(0)
    head = ReadingHead(width=16, cells=4, max_characters=2)
    features = torch.zeros(2, 4, 16)
    features[0, 0, 0] = features[1, 3, 0] = 5.0  # one mark, at the left or at the right
    targets = torch.tensor([[0, END], [END, 0]])  # "a" first, or "a" second
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(features).reshape(-1, END + 1), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(head(features).argmax(-1), targets)


def test_pretrain_reader_resumes_exactly_and_exports_a_whole_micro_checkpoint(tmp_path):
    common = dict(batch_size=4, device="cpu", num_workers=0, log_every=1, crop_px=112, heights_px=(20, 40), warmup_steps=1)
    pretrain.main(pretrain.Args(run_dir=str(tmp_path / "straight"), out=str(tmp_path / "a.safetensors"), steps=4, **common))
    pretrain.main(pretrain.Args(run_dir=str(tmp_path / "resumed"), out=str(tmp_path / "b.safetensors"), steps=2, **common))
    pretrain.main(pretrain.Args(run_dir=str(tmp_path / "resumed"), out=str(tmp_path / "b.safetensors"), steps=4, **common))
    a, b = load_model("micro", weights=str(tmp_path / "a.safetensors")), load_model("micro", weights=str(tmp_path / "b.safetensors"))
    shipped = dict(load_model("micro").module.named_parameters())
    changed = set()
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), name  # resumed = uninterrupted
        if not torch.equal(p, shipped[name]):
            changed.add(name)
    # Only the vision tower trains (ViT, padding embeddings, pooling); the rest is carried over.
    assert changed and all(name.startswith(pretrain.VISION_TOWER) for name in changed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    meta = json.loads(read_metadata(tmp_path / "a.safetensors")["vision_pretraining"])
    assert meta["steps"] == 4 and meta["heights_px"] == [20, 40]


def test_pretrain_reader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--heights-px \\(4, 40\\) is not valid"):
        pretrain.Args(heights_px=(4, 40))
    with pytest.raises(ValueError, match="--crop-px=100 is not valid"):
        pretrain.Args(crop_px=100)
    with pytest.raises(ValueError, match="--steps=0 must be >= 1"):
        pretrain.Args(steps=0)


def test_swap_rolls_images_inside_same_size_groups_only():
    groups = [(torch.arange(3).view(3, 1, 1, 1).expand(3, 2, 2, 3).to(torch.uint8), torch.tensor([0, 2, 3])),
              (torch.full((1, 4, 4, 3), 9, dtype=torch.uint8), torch.tensor([1]))]
    batch = {"groups": groups, "input_ids": torch.zeros(4, 5)}
    swapped, moved = check.swapped(batch)
    assert swapped["groups"][0][0][:, 0, 0, 0].tolist() == [2, 0, 1]  # each got another request's image
    assert torch.equal(swapped["groups"][1][0], groups[1][0]) and moved.tolist() == [True, False, True, True]


def test_reading_check_on_the_shipped_weights_writes_both_columns(tmp_path):
    result = check.main(check.Args(families=("text_vqa", "transcribe"), requests=8, crops=2, out=tmp_path / "r.json"))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["families"] == result["families"] and saved["crop_px"] == 224
    for row in saved["families"]:
        assert 2 <= row["requests"] <= 8
        for column in ("own_image", "other_image"):
            assert np.isfinite(row[column]["first_token_ce"]) and 0 <= row[column]["first_token_accuracy"] <= 1
        assert row["first_token_ce_gain"] == pytest.approx(row["other_image"]["first_token_ce"] - row["own_image"]["first_token_ce"])
        assert row["answer_nll_gain"] == pytest.approx(row["other_image"]["answer_nll"] - row["own_image"]["answer_nll"])
        assert row["own_image"]["answer_nll"] >= row["own_image"]["first_token_ce"] - 1e-6  # a sum of non-negative terms
    with pytest.raises(ValueError, match="--families 'ocr' is not valid"):
        check.Args(families=("ocr",))


def test_reading_check_loads_a_training_state_with_its_crop_size(tmp_path):
    from flexvlm_env.training import init_for_training_, save_training_state

    model = init_for_training_(MolmoE(micro_args(224)))  # defined values (a bare module holds uninitialised memory)
    save_training_state(tmp_path / "state", model, None, {"step": 3, "args": {"crop_px": 224}})
    loaded, source = check.load(str(tmp_path / "state"))
    assert loaded.args.vision.crop_px == 224 and source == "training state at step 3"
    reference = MolmoE(micro_args(224))
    load_training_state(tmp_path / "state", reference, None)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), reference.parameters()))
    assert check.load(None)[1] == str(assets_dir("micro") / "model.safetensors")


def test_fresh_vision_replaces_only_the_vision_tower(tmp_path):
    pretrain.main(pretrain.Args(run_dir=str(tmp_path / "run"), out=str(tmp_path / "f.safetensors"), steps=1, batch_size=2,
                                device="cpu", num_workers=0, crop_px=112, heights_px=(20, 40), fresh_vision=True, lr=1e-9))
    fresh = dict(load_model("micro", weights=str(tmp_path / "f.safetensors")).module.named_parameters())
    for name, p in load_model("micro").module.named_parameters():
        in_tower = name.startswith(pretrain.VISION_TOWER)
        # lr 1e-9: one step moves nothing visibly, so differences are the re-initialisation
        assert torch.equal(fresh[name], p) != in_tower or (in_tower and p.dim() == 1 and "norm" in name) or (
            in_tower and name.endswith(("bias", "class_embedding"))), name
