"""Training pieces: batched preprocessing, the dense MoE, the teacher-forced loss against the
runtime, knob draws, the data stream, resumable state, the train script's resume, and the
shipped micro weights."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, load_script
from flexvlm_env.config import Config
from flexvlm_env.model.args import preset_args
from flexvlm_env.model.checkpoint import file_sha256, read_metadata
from flexvlm_env.model.generate import embed_inputs
from flexvlm_env.model.moe_kernels import moe_reference
from flexvlm_env.model.molmoe import MolmoE
from flexvlm_env.model.preprocess import IGNORE_INDEX, preprocess_image, preprocess_image_batch
from flexvlm_env.model.runtime import VLM, assets_dir, load_model
from flexvlm_env.model.tokenizer import TextTokenizer
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.tasks.procedural import generate_sample
from flexvlm_env.training import (
    ElasticKnobs, TrainBatchSpec, batch_views, build_batch, init_for_training_, load_training_state, moe_dense,
    save_training_state, teacher_forced_loss,
)

ROOT = Path(__file__).resolve().parents[1]
MICRO = preset_args("micro")


@pytest.fixture(scope="module")
def micro_tokenizer() -> TextTokenizer:
    return TextTokenizer.from_file(assets_dir("micro"))


@pytest.fixture(scope="module")
def micro_module() -> MolmoE:
    torch.manual_seed(0)
    return init_for_training_(MolmoE(MICRO), seed=0)


def test_preprocess_image_batch_equals_per_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 200, 300, 3), dtype=np.uint8)
    batch = preprocess_image_batch(torch.from_numpy(images), 6, MICRO.vision, _special())
    for i, image in enumerate(images):
        single = preprocess_image(image, 6, MICRO.vision, _special())
        assert torch.equal(batch.images[i], single.images)
        assert torch.equal(batch.image_masks, single.image_masks)
        assert torch.equal(batch.image_input_idx, single.image_input_idx)
        assert batch.tokens == single.tokens


def test_preprocess_image_batch_rejects_bad_pixels():
    with pytest.raises(ValueError, match="pixels must be uint8"):
        preprocess_image_batch(torch.zeros(2, 10, 10, 3), 1, MICRO.vision, _special())


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_moe_dense_equals_sparse_reference(top_k, norm_topk_prob):
    generator = torch.Generator().manual_seed(top_k)
    h = torch.randn(20, 32, generator=generator, dtype=torch.float64)
    probs = torch.softmax(torch.randn(20, 8, generator=generator, dtype=torch.float64) * 3, dim=-1)
    w_gate_up = torch.randn(8, 2 * 16, 32, generator=generator, dtype=torch.float64) / 6
    w_down = torch.randn(8, 32, 16, generator=generator, dtype=torch.float64) / 4
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    expected = moe_reference(h, ids, weights, w_gate_up, w_down)
    got = moe_dense(h, probs, top_k, w_gate_up, w_down, norm_topk_prob=norm_topk_prob)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_teacher_forced_loss_equals_runtime_next_token_loss(micro_module, micro_tokenizer, norm_topk_prob):
    """The training forward (batched, right-padded, dense MoE) gives the runtime's logits, with
    MolmoE's router and with the renormalising one of the router ablation."""
    if norm_topk_prob:
        renormalising = MolmoE(dataclasses.replace(micro_module.args, norm_topk_prob=True))
        renormalising.load_state_dict(micro_module.state_dict())
        micro_module = renormalising.eval()
    spec = TrainBatchSpec(batch_size=3, seed=1)
    knobs = ElasticKnobs(enabled=False)
    batch = build_batch(0, spec, knobs, MICRO, micro_tokenizer)
    images, masks = batch_views(batch, 12, MICRO.vision, micro_tokenizer.special, "cpu")
    plan = (0, 2, 3, 5, 8, 9, 10, 11, 12, 15)
    _, parts = teacher_forced_loss(
        micro_module, images, masks, batch["input_ids"], batch["labels"], batch["feature_pos"], batch["feature_rows"],
        plan, 4, micro_tokenizer.special.pad,
    )
    vlm = VLM(micro_module, micro_tokenizer, use_cuda_graphs=False, moe_impl="reference")
    for slot in range(spec.batch_size):
        sample = generate_sample(spec.families[int(batch["family"][slot])], "train", slot, seed=0)
        request = vlm.prepare(sample.image, sample.prompt, Config(12, 4, 16))
        prompt_len = request.input_ids.shape[0]
        assert torch.equal(batch["input_ids"][slot, :prompt_len], request.input_ids)
        labels = batch["labels"][slot]
        end = int((labels != IGNORE_INDEX).nonzero().max()) + 1
        features = vlm.module.vision_backbone.project(vlm.encode_image(request.image))
        with torch.no_grad():
            embeds = embed_inputs(vlm.module, batch["input_ids"][slot, None, :end], features, request.image.image_input_idx)
            hidden = vlm.module.transformer(embeds, torch.arange(end)[None], plan, (4,) * 16)
            logits = vlm.module.lm_head(hidden)[0]
        target = labels[:end] != IGNORE_INDEX
        expected = torch.nn.functional.cross_entropy(logits[target], labels[:end][target], reduction="none")
        torch.testing.assert_close(parts["ce"][slot, :end][target], expected, rtol=1e-4, atol=1e-5)


def test_knob_draws_are_deterministic_and_valid():
    knobs = ElasticKnobs()
    draws = [knobs.draw(0, step) for step in range(300)]
    assert draws == [knobs.draw(0, step) for step in range(300)]
    assert draws != [knobs.draw(1, step) for step in range(300)]
    kinds = {d.kind for d in draws}
    assert kinds == {"full", "smallest", "prefix", "random"}
    for d in draws:
        assert d.plan[0] == 0 and list(d.plan) == sorted(set(d.plan)) and 8 <= len(d.plan) <= 16
        assert d.crops in knobs.crops_choices and d.top_k in knobs.top_k_choices
    assert knobs.smallest.plan == tuple(range(8)) and knobs.smallest.top_k == 1 and knobs.smallest.crops == 1
    assert {ElasticKnobs(enabled=False).draw(0, s) for s in range(20)} == {knobs.full}


@pytest.mark.parametrize("kwargs, message", [
    ({"p_full": 1.5}, "p_full=1.5"),
    ({"p_full": 0.7, "p_smallest": 0.5}, "p_full \\+ p_smallest"),
    ({"min_blocks": 0}, "min_blocks=0"),
])
def test_knobs_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticKnobs(**kwargs)


def test_batch_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainBatchSpec(batch_size=0)
    with pytest.raises(ValueError, match="families="):
        TrainBatchSpec(families=("no_such_family",))
    with pytest.raises(ValueError, match="family_weights="):
        TrainBatchSpec(family_weights=(1.0, 2.0))


def test_focus_phase_runs_full_config_on_the_focus_families_then_returns_to_the_mix(micro_tokenizer):
    focus = (0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # only the reading families
    spec = TrainBatchSpec(batch_size=6, seed=2, focus_steps=3, focus_weights=focus)
    knobs = ElasticKnobs(full_until_step=3)
    reading = {spec.families.index(f) for f in ("doc_qa", "text_vqa", "st_qa")}
    for step in range(3):
        assert knobs.draw(2, step) == knobs.full
        assert set(build_batch(step, spec, knobs, MICRO, micro_tokenizer)["family"].tolist()) <= reading
    # After the phase: the elastic draws and the mixed families, exactly as without a curriculum.
    plain_spec, plain_knobs = TrainBatchSpec(batch_size=6, seed=2), ElasticKnobs()
    for step in range(3, 40):
        assert knobs.draw(2, step) == plain_knobs.draw(2, step)
        np.testing.assert_array_equal(spec.probabilities(step), plain_spec.probabilities(step))
    assert any(knobs.draw(2, step) != knobs.full for step in range(3, 40))
    assert torch.equal(build_batch(5, spec, knobs, MICRO, micro_tokenizer)["family"],
                       build_batch(5, plain_spec, plain_knobs, MICRO, micro_tokenizer)["family"])


def test_transcribe_task_is_deterministic_and_answers_its_printed_text(micro_tokenizer):
    from flexvlm_env.training.reading import CHARACTERS, PROMPT, TRANSCRIBE, transcribe_sample

    a, b, other = transcribe_sample(3, seed=1), transcribe_sample(3, seed=1), transcribe_sample(3, seed=2)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.answers == b.answers
    assert not np.array_equal(np.asarray(a.image), np.asarray(other.image)) or a.answers != other.answers
    samples = [transcribe_sample(i) for i in range(60)]
    assert {s.prompt for s in samples} == {PROMPT} and {s.family for s in samples} == {TRANSCRIBE}
    for s in samples:
        (answer,) = s.answers
        assert answer == answer.lower() and 1 <= len(answer) <= 12 and set(answer) <= set(CHARACTERS)
        assert 6 <= s.difficulty["font_size_px"] <= 48
        # Something was printed: the canvas is not one colour.
        assert len(np.unique(np.asarray(s.image).reshape(-1, 3), axis=0)) > 2
    # doc_qa's values (amounts, dates) are among the texts, with their '.' and '-'.
    assert any(set(s.answers[0]) & set(".-") for s in samples)
    # In a batch: the task's samples carry their answer as the training target.
    spec = TrainBatchSpec(batch_size=4, families=("text_vqa", TRANSCRIBE), family_weights=(0.0, 1.0))
    batch = build_batch(0, spec, ElasticKnobs(enabled=False), MICRO, micro_tokenizer)
    assert set(batch["family"].tolist()) == {1}
    first = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert micro_tokenizer.decode(first[:-1]).strip() == transcribe_sample(0).answers[0]


def test_train_script_adds_the_transcribe_task_only_when_weighted():
    script = load_script("train_micro")
    assert script.Args().families[0] == tuple(FAMILIES)
    families, weights, focus = script.Args(transcribe_weight=0.5, focus_transcribe_weight=4.0).families
    assert families[-1] == "transcribe" and weights[-1] == 0.5 and focus[-1] == 4.0 and len(weights) == len(focus) == 10
    with pytest.raises(ValueError, match="--transcribe-weight=-1"):
        script.Args(transcribe_weight=-1)


def test_train_script_checks_the_elastic_shares():
    script = load_script("train_micro")
    assert script.Args(p_full=0.5, p_smallest=0.0).p_smallest == 0.0
    with pytest.raises(ValueError, match="--p-smallest=-0.1 must be in"):
        script.Args(p_smallest=-0.1)
    with pytest.raises(ValueError, match="--p-full \\+ --p-smallest = 1.05"):
        script.Args(p_full=1.0, p_smallest=0.05)
    # A narrower elastic range: top-1 and fewer than 10 blocks are never drawn, the full config still is.
    args = script.Args(top_k_choices=(2, 4, 8), min_blocks=10, p_smallest=0.0)
    knobs = ElasticKnobs(top_k_choices=args.top_k_choices, min_blocks=args.min_blocks, p_smallest=args.p_smallest)
    draws = [knobs.draw(0, step) for step in range(300)]
    assert {d.top_k for d in draws} == {2, 4, 8} and min(len(d.plan) for d in draws) == 10
    assert any(d.kind == "full" for d in draws) and knobs.full.top_k == 8
    with pytest.raises(ValueError, match="--top-k-choices=\\(1, 2, 4\\): give distinct values in 1..8 that include 8"):
        script.Args(top_k_choices=(1, 2, 4))
    with pytest.raises(ValueError, match="--min-blocks=0 must be in 1..16"):
        script.Args(min_blocks=0)


@pytest.mark.parametrize("script_name, kwargs, message", [
    ("train_micro", {"batch_size": 0}, "--batch-size=0 must be >= 1"),
    ("train_micro", {"warmup_steps": -1}, "--warmup-steps=-1 must be >= 0"),
    ("train_micro", {"lr": 0.0}, "--lr=0.0 must be > 0"),
    ("eval_micro", {"requests_per_family": 0}, "--requests-per-family=0 must be >= 1"),
    ("eval_micro", {"grid_requests_per_family": 50, "requests_per_family": 20}, "--grid-requests-per-family=50 must be <="),
    ("train_micro", {"device": "tpu"}, "--device='tpu' is not valid; allowed: auto, cuda, cpu"),
    ("eval_micro", {"split": "bogus"}, "--split='bogus' is not valid; allowed: train, val, test"),
    ("eval_micro", {"device": "tpu"}, "--device='tpu' is not valid; allowed: cpu, cuda, cuda:N"),
    ("eval_micro", {"weights": "/nope.safetensors"}, "--weights='/nope.safetensors' does not exist; allowed:"),
    ("eval_micro", {"quality_table": "/nope"}, "--quality-table='/nope' does not exist; allowed:"),
    ("eval_micro", {"quality_table": str(ROOT / "flexvlm_env" / "assets" / "profiles" / "micro_h200_stages.parquet")},
     "is a 'stages' table; allowed: a `flexvlm-profile quality` table"),
    ("eval_micro", {"latency_source": "nope"}, r"--latency-source='nope' is neither a shipped latency source \(allowed:"),
    ("e5_training_strategies", {"seeds": ()}, r"--seeds=\(\): give one or more seeds >= 0"),
    ("e5_training_strategies", {"methods": ("sarsa",)}, r"unknown: \['sarsa'\]"),
])
def test_scripts_refuse_bad_arguments_when_parsed(script_name, kwargs, message):
    """Checked in the arguments' dataclass, so tyro reports them as usage errors before anything runs."""
    with pytest.raises(ValueError, match=message):
        load_script(script_name).Args(**kwargs)


def _run_script(name: str, *argv: str, timeout: int = 120):
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *argv], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(stderr: str) -> str:
    """A usage error's stderr as one line: tyro boxes its message and wraps it to the terminal's width."""
    import re

    return " ".join(re.sub("[│╭╮╰╯─]", " ", stderr).split())


def test_eval_micro_refuses_a_bad_latency_source_before_evaluating():
    """Checked before the model loads: a bad --latency-source once surfaced only after the half-hour evaluation
    (the timeout here is far shorter than the evaluation)."""
    out = _run_script("eval_micro", "--latency-source", "nope", "--out", "/nonexistent/never.json")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--latency-source='nope' is neither a shipped latency source" in _one_line(out.stderr)


def test_train_script_bad_device_and_changed_resume_are_usage_errors(tmp_path):
    """Exit status 2 naming the argument, before a model is built: --device tpu, and a run directory whose
    checkpoint was made with other arguments (both were tracebacks, exit status 1)."""
    out = _run_script("train_micro", "--device", "tpu", "--run-dir", str(tmp_path / "a"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--device='tpu' is not valid; allowed: auto, cuda, cpu" in _one_line(out.stderr)
    state = tmp_path / "run" / "checkpoint" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"progress": {"step": 4, "args": {"batch_size": 2, "crop_px": 224, "total_steps": 4,
                                                                    "decay_frac": 0.25}}}))
    out = _run_script("train_micro", "--run-dir", str(tmp_path / "run"), "--batch-size", "3", "--device", "cpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip() == ("train_micro.py: error: --batch-size=3 differs from the checkpoint's 2; resuming must keep "
                                  "the data stream and the model (use a new --run-dir to change it)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "run" / "log.jsonl").exists()
    script = load_script("train_micro")
    with pytest.raises(ValueError, match="--total-steps=8: the learning-rate decay already started at step 3"):
        script.check_resume(script.Args(run_dir=str(tmp_path / "run"), batch_size=2, total_steps=8))
    script.check_resume(script.Args(run_dir=str(tmp_path / "run"), batch_size=2, total_steps=4))  # the same run: allowed


def test_train_script_exports_under_the_run_dir_unless_told(tmp_path, micro_module):
    """The default export is `<run-dir>/export`: a smoke run once overwrote the shipped weights. Replacing them takes
    an explicit --export-dir."""
    script = load_script("train_micro")
    args = script.Args(run_dir=str(tmp_path / "run"))
    assert args.export_path == tmp_path / "run" / "export"  # checked before anything is written
    assert script.Args(export_dir="flexvlm_env/assets/micro").export_path == Path("flexvlm_env/assets/micro")
    shipped = assets_dir("micro") / "model.safetensors"
    shipped_sha = file_sha256(shipped)
    script.export(micro_module, args, {"ranking": list(range(16)), "requests": 0}, {"step": 1}, MICRO)
    exported = json.loads((tmp_path / "run" / "export" / "model.json").read_text())
    assert exported["sha256"] == file_sha256(tmp_path / "run" / "export" / "model.safetensors") != shipped_sha
    assert file_sha256(shipped) == shipped_sha


def test_e5_summary_header_records_versions_and_arguments(tmp_path):
    """E5's summary starts with run_header's record (versions, arguments) as every experiment's does; a --merge
    update records its own."""
    e5 = load_script("e5_training_strategies")
    args = e5.Args(methods=("lut",), seeds=(0,), total_env_steps=100, runs_dir=tmp_path / "runs", out=tmp_path / "e5.json")
    host = {"cpu": "test", "threads": 1}
    header = e5.summary_header(args, host, "2026-01-02")
    assert header["experiment"] == "E5" and header["date"] == "2026-01-02" and header["machine"] == host
    assert header["versions"]["python"] and header["versions"]["numpy"] == np.__version__
    assert header["args"]["seeds"] == [0] and header["args"]["runs_dir"] == str(tmp_path / "runs")
    assert header["total_env_steps"] == 100 and header["threshold"] and header["latency_source"] == "molmoe-1b-h100"
    json.dumps(header)  # what the summary file holds
    previous = {**header, "updates": [{"methods": ["lut"], "date": "2026-01-01"}], "entries": []}
    merged = e5.summary_header(args, host, "2026-01-03", previous)
    assert "entries" not in merged and merged["date"] == "2026-01-02"  # the first run's header is kept
    (update,) = merged["updates"]  # the earlier update of only these methods is superseded
    assert update["date"] == "2026-01-03" and update["versions"]["python"] and update["args"]["methods"] == ["lut"]


def test_focus_phase_rejects_bad_values():
    with pytest.raises(ValueError, match="focus_steps=2 needs focus_weights"):
        TrainBatchSpec(focus_steps=2)
    with pytest.raises(ValueError, match="focus_weights="):
        TrainBatchSpec(focus_steps=2, focus_weights=(1.0,))
    with pytest.raises(ValueError, match="full_until_step=-1"):
        ElasticKnobs(full_until_step=-1)
    script = load_script("train_micro")
    with pytest.raises(ValueError, match="--focus-steps=9 must be in 0..--total-steps=5"):
        script.Args(total_steps=5, focus_steps=9)
    with pytest.raises(ValueError, match="--focus-weights=\\(1.0, 2.0\\): give 9"):
        script.Args(focus_weights=(1.0, 2.0))


def test_build_batch_is_a_pure_function_of_step(micro_tokenizer):
    spec = TrainBatchSpec(batch_size=4, seed=3)
    knobs = ElasticKnobs()
    a, b = (build_batch(5, spec, knobs, MICRO, micro_tokenizer) for _ in range(2))
    for key in ("input_ids", "labels", "feature_pos", "feature_rows", "family"):
        assert torch.equal(a[key], b[key])
    other = build_batch(6, spec, knobs, MICRO, micro_tokenizer)
    assert not torch.equal(a["input_ids"][:, :20], other["input_ids"][:, :20]) or a["crops"] != other["crops"]
    special = micro_tokenizer.special
    # Teacher forcing: each label is the next input token, ending with EOS.
    target = a["labels"] != IGNORE_INDEX
    rows, cols = target.nonzero(as_tuple=True)
    assert torch.equal(a["labels"][rows, cols], a["input_ids"][rows, cols + 1])
    for slot in range(spec.batch_size):
        assert a["labels"][slot][target[slot]][-1] == special.eos
    # Features land on <im_patch> tokens, each at most once.
    flat_ids = a["input_ids"].reshape(-1)
    assert bool((flat_ids[a["feature_pos"]] == special.im_patch).all())
    assert a["feature_pos"].unique().numel() == a["feature_pos"].numel()


def test_training_reduces_loss_on_a_fixed_batch(micro_tokenizer):
    torch.manual_seed(0)
    module = init_for_training_(MolmoE(MICRO), seed=1)
    # One crop keeps the sequences short (fast on a CPU); the answers still depend on the images.
    knobs = ElasticKnobs(enabled=False, crops_choices=(1,))
    batch = build_batch(0, TrainBatchSpec(batch_size=2), knobs, MICRO, micro_tokenizer)
    images, masks = batch_views(batch, 1, MICRO.vision, micro_tokenizer.special, "cpu")
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):  # the loss falls below 1.5 at step 26 and to about 0.7 at step 30 (this CPU)
        loss, _ = teacher_forced_loss(module, images, masks, batch["input_ids"], batch["labels"], batch["feature_pos"],
                                      batch["feature_rows"], tuple(range(16)), 8, micro_tokenizer.special.pad)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 6.0 and losses[-1] < 1.5  # from ~ln(1024) to memorising the two answers


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MolmoE(TINY).init_random_(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.float().pow(2).sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    save_training_state(tmp_path / "ckpt", model, optimizer, {"step": 7}, max_shard_size="1MB")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1  # sharded below the limit
    restored = MolmoE(TINY).init_random_(1)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    progress = load_training_state(tmp_path / "ckpt", restored, restored_opt)
    assert progress == {"step": 7, "optimizer_restored": True}
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict()["state"], restored_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for index in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[index][key], loaded[index][key]), (index, key)
    save_training_state(tmp_path / "weights", model, None, {"step": 7})
    assert load_training_state(tmp_path / "weights", MolmoE(TINY), restored_opt)["optimizer_restored"] is False
    with pytest.raises(FileNotFoundError, match="no training state"):
        load_training_state(tmp_path / "missing", restored, None)


def test_train_script_resume_equals_uninterrupted(tmp_path):
    script = load_script("train_micro")
    common = dict(batch_size=2, device="cpu", num_workers=0, warmup_steps=1, decay_frac=0.0, log_every=1,
                  finalize=False, checkpoint_minutes=1e9)
    script.main(script.Args(run_dir=str(tmp_path / "straight"), total_steps=4, **common))
    script.main(script.Args(run_dir=str(tmp_path / "resumed"), total_steps=2, **common))
    script.main(script.Args(run_dir=str(tmp_path / "resumed"), total_steps=4, **common))
    a, b = MolmoE(MICRO), MolmoE(MICRO)
    assert load_training_state(tmp_path / "straight" / "checkpoint", a, None)["step"] == 4
    load_training_state(tmp_path / "resumed" / "checkpoint", b, None)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing lost, nothing logged twice
    with pytest.raises(ValueError, match="--batch-size=3 differs"):
        script.main(script.Args(run_dir=str(tmp_path / "resumed"), total_steps=6, **{**common, "batch_size": 3}))


def test_shipped_micro_weights_match_their_card():
    directory = assets_dir("micro")
    card = json.loads((directory / "model.json").read_text())
    path = directory / "model.safetensors"
    assert file_sha256(path) == card["sha256"]
    assert path.stat().st_size <= 20e6
    meta = read_metadata(path)
    assert json.loads(meta["block_ranking"]) == card["block_ranking"]["ranking"]
    vlm = load_model("micro")
    assert not vlm.random_weights and vlm.weights_sha256 == card["sha256"]
    assert sorted(vlm.block_ranking) == list(range(16)) and vlm.block_ranking[0] == 0
    assert "skipped" in vlm.ranking_source


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_forced_loss_on_cuda_bf16_matches_cpu(micro_module, micro_tokenizer):
    batch = build_batch(0, TrainBatchSpec(batch_size=8), ElasticKnobs(enabled=False), MICRO, micro_tokenizer)
    args = lambda device: [batch[k].to(device) for k in ("input_ids", "labels", "feature_pos", "feature_rows")]  # noqa: E731
    images, masks = batch_views(batch, 12, MICRO.vision, micro_tokenizer.special, "cpu")
    cpu_loss, _ = teacher_forced_loss(micro_module, images, masks, *args("cpu"), tuple(range(16)), 8, micro_tokenizer.special.pad)
    gpu_module = init_for_training_(MolmoE(MICRO), seed=0).cuda()
    images_gpu, masks_gpu = batch_views(batch, 12, MICRO.vision, micro_tokenizer.special, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_loss, _ = teacher_forced_loss(gpu_module, images_gpu, masks_gpu, *args("cuda"), tuple(range(16)), 8, micro_tokenizer.special.pad)
    torch.testing.assert_close(gpu_loss.float().cpu(), cpu_loss, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_forced_loss_without_gradients_under_bf16_autocast(micro_tokenizer):
    # finetune_lora.py's anchor reference and eval-style forwards run under torch.no_grad() inside the bf16
    # autocast: the ViT's fused add + LayerNorm kernel must step aside there (it does not cast, and once failed
    # with "residual must match x (torch.bfloat16 ...), got torch.float32").
    batch = build_batch(0, TrainBatchSpec(batch_size=8), ElasticKnobs(enabled=False), MICRO, micro_tokenizer)
    tensors = [batch[k].cuda() for k in ("input_ids", "labels", "feature_pos", "feature_rows")]
    images, masks = batch_views(batch, 12, MICRO.vision, micro_tokenizer.special, "cuda")
    module = init_for_training_(MolmoE(MICRO), seed=0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with_grad, _ = teacher_forced_loss(module, images, masks, *tensors, tuple(range(16)), 8, micro_tokenizer.special.pad)
        with torch.no_grad():
            without_grad, _ = teacher_forced_loss(module, images, masks, *tensors, tuple(range(16)), 8, micro_tokenizer.special.pad)
    torch.testing.assert_close(without_grad.float(), with_grad.detach().float())


def _special():
    return TextTokenizer.from_file(assets_dir("micro")).special


def test_training_curves_figure_from_the_log(tmp_path):
    pytest.importorskip("matplotlib")
    from flexvlm_env.figures import training_curves

    records = [{"step": s, "ce/full": 3.0 / s, "ce/smallest": 4.0 / s, "ce_family/okvqa": 2.0 / s} for s in (1, 2, 3)]
    path = training_curves(records, tmp_path / "curves.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_train_script_init_from_shipped_weights(tmp_path):
    """A new run can start from trained weights (continuing training with a fresh data seed)."""
    script = load_script("train_micro")
    script.main(script.Args(run_dir=str(tmp_path / "run"), total_steps=1, batch_size=2, device="cpu", num_workers=0,
                            finalize=False, seed=7, lr=1e-9, init_from=str(assets_dir("micro") / "model.safetensors")))
    trained, shipped = MolmoE(MICRO), load_model("micro").module
    load_training_state(tmp_path / "run" / "checkpoint", trained, None)
    for (name, p), q in zip(trained.named_parameters(), shipped.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_distribution_summary_known_values():
    from flexvlm_env.benchmarking import distribution_summary

    stats = distribution_summary([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and stats["median"] == 2.5 and stats["n"] == 4
    assert stats["p95"] == pytest.approx(3.85) and stats["p99"] == pytest.approx(3.97)
    assert stats["std"] == pytest.approx(1.118034, rel=1e-6) and stats["cov"] == pytest.approx(0.4472136, rel=1e-6)
    with pytest.raises(ValueError, match="at least one value"):
        distribution_summary([])


def test_batch_shards_compose_the_global_batch(micro_tokenizer):
    # Data parallelism: shard r of n holds slots [r*B/n, (r+1)*B/n) of the very same global batch.
    knobs = ElasticKnobs(enabled=True)
    whole = build_batch(3, TrainBatchSpec(batch_size=6, seed=2), knobs, MICRO, micro_tokenizer)
    shards = [build_batch(3, TrainBatchSpec(batch_size=6, seed=2, shard_index=r, shard_count=3), knobs, MICRO, micro_tokenizer)
              for r in range(3)]
    pad = micro_tokenizer.special.pad

    def rows(batch):
        return [(ids[ids != pad].tolist(), lab[lab >= 0].tolist()) for ids, lab in zip(batch["input_ids"], batch["labels"])]

    assert [row for shard in shards for row in rows(shard)] == rows(whole)
    assert torch.equal(torch.cat([s["family"] for s in shards]), whole["family"])
    assert all(s["input_ids"].shape[0] == 2 and s["crops"] == whole["crops"] for s in shards)
    with pytest.raises(ValueError, match="multiple of shard_count"):
        TrainBatchSpec(batch_size=5, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        TrainBatchSpec(batch_size=4, shard_index=2, shard_count=2)


def test_train_script_data_parallel_under_torchrun(tmp_path):
    # Two CPU processes (gloo): each trains on its shard, gradients are averaged, and the script
    # itself compares the replicas' weight checksums at every log step (it raises if they differ).
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(ROOT / "scripts" / "train_micro.py"), "--run-dir", str(run_dir), "--total-steps", "3", "--batch-size", "4",
         "--device", "cpu", "--num-workers", "0", "--log-every", "1", "--warmup-steps", "1", "--no-finalize"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # rank 0 alone logs
    trained = MolmoE(MICRO)
    assert load_training_state(run_dir / "checkpoint", trained, None)["step"] == 3
    initial = init_for_training_(MolmoE(MICRO), seed=0)
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), initial.parameters()))


def test_wsd_learning_rate_known_values():
    from flexvlm_env.training import wsd_learning_rate

    lr = lambda step: wsd_learning_rate(step, peak_lr=1.0, warmup_steps=4, total_steps=20, decay_frac=0.5, min_lr_frac=0.1)  # noqa: E731
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(9) == 1.0  # plateau until step int(20 * 0.5) = 10
    assert lr(10) == pytest.approx(1.0) and lr(15) == pytest.approx(0.55) and lr(20) == pytest.approx(0.1)
    assert lr(1000) == pytest.approx(0.1)


def test_window_stats_per_kind_and_family_means():
    from flexvlm_env.training import WindowStats

    stats = WindowStats(("a", "b"), "cpu")
    ce = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
    stats.add("full", ce, labels, torch.tensor([0, 1]), torch.tensor(2.0), torch.tensor(1.0))
    stats.add("full", ce * 3, labels, torch.tensor([0, 0]), torch.tensor(4.0), torch.tensor(3.0))
    record = stats.read()
    # per-sample CE: (2, 4) then (6, 12); kind mean = mean of step means (3, 9) = 6
    assert record["ce/full"] == pytest.approx(6.0) and record["grad_norm/full"] == 3.0 and record["balance/full"] == 2.0
    assert record["ce_family/a"] == pytest.approx((2 + 6 + 12) / 3) and record["ce_family/b"] == pytest.approx(4.0)
    assert stats.read() == {"ce_family/a": None, "ce_family/b": None}  # reset after reading


def test_window_stats_family_absent_from_a_window_is_null_not_zero(tmp_path):
    """A family the window did not draw has no loss (JSON null), not 0.0, which reads as a perfect one; the
    training-curves figure leaves a gap there."""
    from flexvlm_env.training import WindowStats, append_log

    stats = WindowStats(("a", "b"), "cpu")
    stats.add("full", torch.tensor([[2.0]]), torch.tensor([[5]]), torch.tensor([0]), torch.tensor(1.0), torch.tensor(1.0))
    record = stats.read()
    assert record["ce_family/a"] == pytest.approx(2.0) and record["ce_family/b"] is None
    append_log(tmp_path / "log.jsonl", {"step": 1, **record})
    assert '"ce_family/b": null' in (tmp_path / "log.jsonl").read_text()
    pytest.importorskip("matplotlib")
    from flexvlm_env.figures import training_curves

    records = [{"step": 1, "ce/full": 2.0, "ce_family/a": 2.0, "ce_family/b": None},
               {"step": 2, "ce/full": 1.0, "ce_family/a": 1.0, "ce_family/b": 3.0}]
    assert training_curves(records, tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_compiled_loss_equals_eager(micro_tokenizer):
    """train_micro.py --compile: torch.compile(teacher_forced_loss, dynamic=True) gives the eager
    loss and gradients, across two batches of different lengths (one dynamic-shape graph)."""
    module = init_for_training_(MolmoE(MICRO), seed=0)
    compiled = torch.compile(teacher_forced_loss, dynamic=True)
    knobs = ElasticKnobs(enabled=False)
    for step in range(2):
        batch = build_batch(step, TrainBatchSpec(batch_size=2), knobs, MICRO, micro_tokenizer)
        images, masks = batch_views(batch, 12, MICRO.vision, micro_tokenizer.special, "cpu")
        inputs = (module, images, masks, batch["input_ids"], batch["labels"], batch["feature_pos"], batch["feature_rows"],
                  tuple(range(16)), 8, micro_tokenizer.special.pad)
        grads = []
        for fn in (teacher_forced_loss, compiled):
            module.zero_grad()
            loss, _ = fn(*inputs)
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
        (eager_loss, eager), (compiled_loss, other) = grads
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert eager.keys() == other.keys()
        scale = max(g.abs().max() for g in eager.values())
        # Absolute to the largest gradient (key biases have exactly-zero gradients up to rounding).
        # The first batch agrees to ~1e-7 of it; the dynamic-shape graph of the second reduces in
        # another order and agrees to ~2e-4 through 22 layers.
        for name in eager:
            torch.testing.assert_close(other[name], eager[name], rtol=0, atol=1e-3 * scale, msg=name)


def test_train_script_width_ablations_change_the_experts_and_router_only(tmp_path):
    """--expert-hidden and --norm-topk-prob (ablations of the width knob) train and export experts of
    that size and a renormalising router, and the export loads through load_model like the shipped
    weights; a bad size is refused by name, and so is resuming with another router."""
    script = load_script("train_micro")
    with pytest.raises(ValueError, match="--expert-hidden=0 must be >= 1"):
        script.Args(expert_hidden=0)
    args = script.Args(run_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"), total_steps=1, batch_size=2,
                       device="cpu", num_workers=0, seed=7, expert_hidden=32, norm_topk_prob=True, finalize=False)
    script.main(args)
    model_args = dataclasses.replace(MICRO, expert_hidden=32, norm_topk_prob=True)
    trained = MolmoE(model_args)
    load_training_state(tmp_path / "run" / "checkpoint", trained, None)
    # The export itself (the block ranking it would measure first is 17 full evaluations: left out here).
    script.export(trained, args, {"ranking": list(range(16)), "requests": 0}, {"step": 1}, model_args)
    vlm = load_model("micro", weights=str(tmp_path / "export" / "model.safetensors"), device="cpu", dtype="float32")
    assert vlm.args.expert_hidden == 32 and vlm.args.d_model == MICRO.d_model and vlm.args.norm_topk_prob
    mlp = vlm.module.transformer.blocks[0].mlp
    assert mlp.norm_topk_prob
    assert tuple(mlp.w_gate_up.shape) == (64, 64, 128) and tuple(mlp.w_down.shape) == (64, 128, 32)
    assert json.loads((tmp_path / "export" / "model.json").read_text())["training"]["args"]["expert_hidden"] == 32
    with pytest.raises(ValueError, match="--expert-hidden=16 differs from the checkpoint's 32"):
        script.main(dataclasses.replace(args, expert_hidden=16, total_steps=2))
    with pytest.raises(ValueError, match="--norm-topk-prob=False differs from the checkpoint's True"):
        script.main(dataclasses.replace(args, norm_topk_prob=False, total_steps=2))


def test_eval_micro_writes_the_committed_result_only_for_the_shipped_weights_full_run(tmp_path):
    """results/micro_quality.json is the shipped weights' full evaluation: a quick run or another checkpoint's goes to
    results/quick/ unless --out says where."""
    script = load_script("eval_micro")
    assert script.Args().out == "results/micro_quality.json"
    quick = "results/quick/micro_quality.json"
    assert script.Args(requests_per_family=20, grid_requests_per_family=4).out == quick
    assert script.Args(latency_repeats=1).out == quick
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert script.Args(weights=str(weights)).out == quick
    assert script.Args(weights=str(weights), out=str(tmp_path / "q.json")).out == str(tmp_path / "q.json")
    # a recorded quality table replaces the sampled requests: their sizes do not make a run smaller; the committed
    # result times latency here, so a run on a recorded latency source is another result
    shipped = ROOT / "flexvlm_env" / "assets" / "profiles" / "micro_quality_val.parquet"
    assert script.Args(quality_table=str(shipped), requests_per_family=1,
                       grid_requests_per_family=1).out == "results/micro_quality.json"
    assert script.Args(quality_table=str(shipped), latency_source="micro-h200").out == quick


def test_a_crash_between_the_renames_of_a_save_leaves_the_last_state_to_resume_from(tmp_path, monkeypatch):
    """save_training_state renames the old state aside, then the new one into place: a crash in between leaves no
    `checkpoint/`, and the readers (load_training_state, a resumed flexvlm-train run) must find the old one instead
    of starting over."""
    import os

    import flexvlm_env.training.state as state
    from trainers.common import Run
    from trainers.lut import Args

    run = Run("lut", Args(runs_dir=tmp_path, wandb=False, total_env_steps=140, eval_every_env_steps=140))
    model = torch.nn.Linear(2, 2)
    save_training_state(run.checkpoint_dir, model, None, {"step": 1})
    real_replace, calls = os.replace, []

    def crash_on_the_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(state.os, "replace", crash_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(run.checkpoint_dir, model, None, {"step": 2})
    monkeypatch.undo()
    assert not run.checkpoint_dir.exists() and (run.dir / ".checkpoint.replaced").is_dir()
    resumed = Run("lut", Args(resume=run.dir, wandb=False, total_env_steps=140, eval_every_env_steps=140))
    assert (resumed.checkpoint_dir / "state.json").exists()  # what the trainers look for before loading
    assert load_training_state(resumed.checkpoint_dir, torch.nn.Linear(2, 2), None)["step"] == 1
    # load_training_state recovers on its own too (finetune_lora.py, train_micro.py)
    os.replace(resumed.checkpoint_dir, run.dir / ".checkpoint.replaced")
    assert load_training_state(resumed.checkpoint_dir, torch.nn.Linear(2, 2), None)["step"] == 1
