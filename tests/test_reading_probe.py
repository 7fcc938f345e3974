"""The reading probe (scripts/reading_probe.py): its images, its chance levels, its learning on an
easy setting, and its argument errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_script
from flexvlm_env.tasks.procedural.render import text_ink_size

probe = load_script("reading_probe")


@pytest.mark.parametrize("height_px", [8, 14, 28])
def test_font_size_gives_the_requested_ink_height(height_px):
    size = probe.font_size_for_height(height_px)
    assert abs(text_ink_size("HXE", size)[1] - height_px) <= 1


def test_rendered_word_is_a_crop_with_ink_of_another_colour():
    rng = np.random.default_rng(0)
    image = probe.render_word("QXB", 20, 112, rng)
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8
    # The ink differs from the background by far more than the +-12 noise somewhere in the crop.
    background = np.median(image.reshape(-1, 3), axis=0)
    assert np.abs(image.astype(int) - background).max() > 60
    images, labels = probe.make_batch(4, 14, 112, np.random.default_rng(1))
    assert images.shape == (4, 112, 112, 3) and labels.shape == (4, 3) and labels.max() < 26


def test_reader_outputs_letter_logits():
    torch.manual_seed(0)
    model = probe.Reader()
    images, _ = probe.make_batch(2, 20, model.vision.crop_px, np.random.default_rng(0))
    assert model(torch.from_numpy(images)).shape == (2, 3, 26)


def test_reader_can_fit_a_small_set_of_words():
    """The reader's gradient path works end to end: on 8 fixed images of large text it fits the
    letters (whether it generalises at a text size is what the probe itself measures). Chance is
    1 / 26; seeds 0-5 fit 22-24 of the 24 letters in 60 steps on this project's CPU."""
    torch.manual_seed(0)
    model = probe.Reader()
    images, labels = probe.make_batch(8, 28, model.vision.crop_px, np.random.default_rng(0))
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    fit(model, images, labels, steps=60)
    assert probe.evaluate(model, images, labels)["letter_accuracy"] >= 0.8


def fit(model, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images).reshape(-1, 26), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_probe_writes_its_curves_and_figure(tmp_path):
    args = probe.Args(heights_px=(28,), steps=4, batch_size=8, eval_every=2, eval_images=16,
                      out=tmp_path / "probe.json", figure=tmp_path / "probe.png")
    result = probe.main(args)
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["chance"]["letter_accuracy"] == pytest.approx(1 / 26)
    assert [p["step"] for p in saved["runs"][0]["curve"]] == [2, 4] and saved["runs"] == result["runs"]
    assert all(0 <= p["letter_accuracy"] <= 1 for p in saved["runs"][0]["curve"])
    assert (tmp_path / "probe.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kwargs, match", [
    ({"heights_px": (3,)}, r"--heights-px 3 is not valid; allowed: 6 to 112 \(the crop is 224 px\)"),
    ({"steps": 0}, "--steps=0 must be >= 1"),
    ({"lr": 0.0}, "--lr=0.0 must be > 0"),
])
def test_probe_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        probe.Args(**kwargs)


def test_probe_resumes_height_by_height(tmp_path, monkeypatch):
    """A finished height is kept, not rerun; other settings in the same --out are refused."""
    common = dict(steps=2, batch_size=4, eval_every=1, eval_images=8, out=tmp_path / "p.json", figure=tmp_path / "p.png")
    first = probe.main(probe.Args(heights_px=(20,), **common))
    ran = []
    real_probe = probe.probe
    monkeypatch.setattr(probe, "probe", lambda height, args: ran.append(height) or real_probe(height, args))
    second = probe.main(probe.Args(heights_px=(28, 20), **common))
    assert ran == [28]
    assert [r["height_px"] for r in second["runs"]] == [20, 28]
    assert second["runs"][0] == first["runs"][0]
    with pytest.raises(ValueError, match="holds a probe with other settings"):
        probe.main(probe.Args(heights_px=(20,), **{**common, "steps": 3}))


def test_reader_on_pooled_features_outputs_letter_logits_and_fits():
    """--read-from pooled reads through micro's own 2x2 attention pooling (64 dims per cell). It fits
    more slowly than the ViT's cells: seeds 0-5 fit 21-24 of 24 letters in 120 steps."""
    torch.manual_seed(0)
    model = probe.Reader("pooled")
    images, labels = probe.make_batch(8, 28, model.vision.crop_px, np.random.default_rng(0))
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    assert model(images).shape == (8, 3, 26)
    fit(model, images, labels, steps=120)
    assert probe.evaluate(model, images, labels)["letter_accuracy"] >= 0.8
    with pytest.raises(ValueError, match="--read-from='cells' is not valid"):
        probe.Args(read_from="cells")


def test_probe_can_start_from_the_shipped_vision_tower(tmp_path):
    from flexvlm_env.model.runtime import load_model

    seen = {}
    real_reader = probe.Reader

    def spy(read_from):
        seen["model"] = real_reader(read_from)
        return seen["model"]

    probe.Reader = spy
    try:
        probe.main(probe.Args(heights_px=(20,), steps=1, batch_size=2, eval_every=1, eval_images=4, read_from="pooled",
                              init="shipped", lr=1e-9, out=tmp_path / "p.json", figure=tmp_path / "p.png"))
    finally:
        probe.Reader = real_reader
    shipped = load_model("micro").module.vision_backbone
    torch.testing.assert_close(seen["model"].pool.wq.weight, shipped.image_pooling_2d.wq.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["model"].vit.patch_embedding.weight, shipped.image_vit.patch_embedding.weight, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--init='clip' is not valid"):
        probe.Args(init="clip")
