"""The LM controllers (`agents.lm`, `trainers/dpo.py`, `trainers/grpo.py`): vocabulary, text rendering and parsing,
the NumPy decoder against `transformers`, save/load, the trainers' CLI, resume and learning.

Fast tests build controllers from the replay env's observations in-process; the `slow` ones run the trainers
(subprocess smoke runs, crash-and-resume, learning against the random controller).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import flexvlm_env  # noqa: F401  (registers the env ids)
from conftest import load_script
from agents.base import CONTROLLER_FILE, WEIGHTS_FILE, RandomController, as_batch, load_controller, stack_observations
from agents.evaluation import decision_overhead_ms, evaluate, evaluation_requests
from agents.features import observation_features
from agents.lm import (
    EOS,
    FEATURE_TOKENS,
    PROMPT_LENGTH,
    FeatureBuckets,
    LMController,
    Vocabulary,
    format_warm_start,
    make_model,
    parse_config,
    pool_observations,
    prompt_ids,
    prompt_ids_one,
    render_config,
    render_observation,
    render_observations,
)
from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import FAMILY_NAMES

pytest.importorskip("trl")

CLI = str(Path(sys.executable).with_name("flexvlm-train"))
FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The trainers run PyTorch on one thread (tiny model, shared cores); so do these tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_pool():
    env = gym.make("FlexVLMReplay-v0", split="train", episode_length=1)
    return pool_observations(env, FRACTIONS)


@pytest.fixture(scope="module")
def heldout_batch():
    """Raw observations of 100 held-out (request, budget) pairs."""
    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    observations = []
    for i in range(100):
        observation, _ = env.reset(seed=i, options={"budget_fraction": FRACTIONS[i % 5]})
        observations.append(observation)
    return stack_observations(observations)


def random_controller(train_pool, seed: int = 0, std: float = 0.5, kind: str = "grpo") -> LMController:
    """A controller with random, not near-uniform, weights, so that decisions vary across requests."""
    controller = LMController.create(train_pool[0], kind=kind, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controller.model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return controller


@pytest.fixture(scope="module")
def controller(train_pool) -> LMController:
    return random_controller(train_pool)


# -- vocabulary, text, parsing ----------------------------------------------------------------------


def test_tokenizer_gives_the_prompt_ids_of_the_rendered_text(controller, heldout_batch):
    texts = controller.render(heldout_batch)
    ids = controller.prompt_ids(heldout_batch)
    assert ids.shape == (100, PROMPT_LENGTH)
    assert controller.tokenizer(texts)["input_ids"] == ids.tolist()  # <bos> prepended, as TRL tokenizes prompts
    assert controller.vocabulary.unk_id not in ids
    decoded = controller.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    assert decoded == texts[0]
    vocabulary = controller.vocabulary
    assert len(vocabulary) == len(controller.tokenizer) < 300
    assert controller.tokenizer.pad_token_id == vocabulary.pad_id and controller.tokenizer.eos_token_id == vocabulary.eos_id
    assert controller.tokenizer.padding_side == "left"


def test_render_observation_names_the_family_and_every_bucketed_feature(controller, heldout_batch):
    single = {key: value[3] for key, value in heldout_batch.items()}
    single["family"] = int(single["family"])
    text = render_observation(single, controller.buckets)
    words = text.split()
    assert words[0] == f"family={FAMILY_NAMES[single['family']]}" and words[-1] == "config:"
    assert [w.split("=")[0] for w in words[1:-1]] == list(FEATURE_TOKENS)
    assert all(0 <= int(w.split("=")[1]) < controller.buckets.n_buckets for w in words[1:-1])
    assert render_observations(heldout_batch, controller.buckets)[3] == text
    # a tighter budget never lands in a higher budget bucket
    tight, loose = dict(single), dict(single)
    tight["budget_fraction"], loose["budget_fraction"] = np.float32([0.35]), np.float32([1.0])
    buckets = [int(render_observation(o, controller.buckets).split()[1].split("=")[1]) for o in (tight, loose)]
    assert buckets[0] < buckets[1]


def test_buckets_fit_one_bucket_per_budget_fraction(train_pool):
    buckets = FeatureBuckets.fit(train_pool[0])
    np.testing.assert_allclose(buckets.edges[0], FRACTIONS, rtol=1e-6)  # budget_fraction: its distinct values
    assert FeatureBuckets.from_json(json.loads(json.dumps(buckets.to_json()))).to_json() == buckets.to_json()


def test_every_config_round_trips_through_text_and_ids():
    vocabulary = Vocabulary()
    grid = KnobGrid()
    for index in range(len(grid)):
        text = render_config(index, grid)
        config = grid.configs()[index]
        assert text == f"crops={config.crops} top_k={config.top_k} active_blocks={config.active_blocks}"
        ids = vocabulary.completion_ids(index)
        assert parse_config(text) == parse_config(text + EOS) == parse_config(text + " " + EOS) == index
        assert parse_config(ids) == parse_config(ids[:3]) == parse_config(ids + [vocabulary.pad_id] * 2) == index
        assert parse_config(torch.tensor(ids)) == parse_config(np.array(ids)) == index


@pytest.mark.parametrize("output", [
    "", "crops=4", "crops=4 top_k=2", "top_k=2 crops=4 active_blocks=12", "crops=4 top_k=2 active_blocks=12 crops=4",
    "crops=5 top_k=2 active_blocks=12", "crops=4 top_k=3 active_blocks=12", "crops=4 top_k=2 active_blocks=9",
    "crops=4 crops=4 active_blocks=12", "crops = 4 top_k = 2 active_blocks = 12", "use the full configuration",
    "crops=4 top_k=2 active_blocks=12 <eos> crops=4", "<eos> crops=4 top_k=2 active_blocks=12",
    "crops=4 top_k=2 <eos> active_blocks=12", "family=okvqa top_k=2 active_blocks=12", "config: crops=4 top_k=2 active_blocks=12",
])
def test_invalid_text_parses_to_none(output):
    assert parse_config(output) is None


def test_invalid_ids_parse_to_none():
    v = Vocabulary()
    crops, top_k, blocks = (int(ids[0]) for ids in v.knob_ids)
    for ids in ([], [crops], [crops, top_k], [top_k, crops, blocks], [crops, top_k, blocks, crops],
                [crops, top_k, blocks, v.pad_id], [v.eos_id, crops, top_k, blocks], [crops, top_k, v.eos_id],
                [crops, top_k, blocks, v.eos_id, crops], [crops, top_k, len(v)], [-1, top_k, blocks],
                [v.bos_id, crops, top_k, blocks], [crops, crops, blocks]):
        assert parse_config(ids, v) is None, ids


# -- decoding ------------------------------------------------------------------------------------------


def test_numpy_decoder_matches_transformers(controller, heldout_batch):
    ids = controller.prompt_ids(heldout_batch)[:20]
    model = controller.model.eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    cache: list = []
    ours = controller.decoder.forward(ids[:, :-3], cache, 0)
    np.testing.assert_allclose(ours, logits[:, -4], atol=2e-4, rtol=1e-4)
    for position in range(PROMPT_LENGTH - 3, PROMPT_LENGTH):  # the KV-cache path, one token at a time
        ours = controller.decoder.forward(ids[:, position:position + 1], cache, position)
        np.testing.assert_allclose(ours, logits[:, position], atol=2e-4, rtol=1e-4)
    # greedy, unconstrained: the same tokens as transformers' generate
    with torch.inference_mode():
        generated = model.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                   max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None)
    mine = controller.generate({k: v[:20] for k, v in heldout_batch.items()}, constrained=False)
    np.testing.assert_array_equal(mine, generated[:, PROMPT_LENGTH:].numpy())


def test_decoder_sees_in_place_optimizer_updates(train_pool, heldout_batch):
    controller = random_controller(train_pool, seed=3)
    before = controller.decoder.forward(controller.prompt_ids(heldout_batch), [], 0)
    optimizer = torch.optim.AdamW(controller.model.parameters(), lr=0.05, fused=True)  # fused: no version bump
    ids = torch.from_numpy(controller.prompt_ids(heldout_batch))
    controller.model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = controller.decoder.forward(ids.numpy(), [], 0)
    with torch.inference_mode():
        expected = controller.model(input_ids=ids).logits[:, -1].numpy()
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_allclose(after, expected, atol=2e-4, rtol=1e-4)


def test_constrained_decisions_are_always_valid(train_pool, heldout_batch):
    controller = LMController.create(train_pool[0], seed=0)  # fresh: its unconstrained answers are garbage
    assert controller.invalid_output_rate(heldout_batch) == 1.0
    indices = controller.select_indices(heldout_batch)
    assert indices.dtype == np.int64 and indices.shape == (100,)
    assert ((indices >= 0) & (indices < 140)).all()


def test_batched_decisions_equal_single_ones(controller, heldout_batch):
    indices = controller.select_indices(heldout_batch)
    assert len(np.unique(indices)) > 5  # random weights: decisions vary
    for i in range(0, 100, 7):
        single = {key: value[i] for key, value in heldout_batch.items()}
        config = controller.select_config(single)
        assert config == controller.grid.configs()[indices[i]]
        np.testing.assert_array_equal(controller.select_action(single), np.unravel_index(indices[i], (7, 4, 5)))


class NumpyAsDevice:
    """Stands in for `lm_gpu.GPUDecoder` on a machine without CUDA: NumPy's greedy constrained answer, with
    the prompts it was asked about recorded."""

    def __init__(self, controller):
        self.controller, self.prompts = controller, []

    def decide(self, prompt):
        self.prompts.append(prompt.copy())
        knobs = self.controller.vocabulary.knob_ids
        return self.controller.decoder.decode(prompt, lambda step, logits: knobs[step][np.argmax(logits[:, knobs[step]], 1)], 3)


def test_batch_1_device_path_decides_as_the_batch_path(controller, heldout_batch):
    """With a decision device, one observation goes through its own path (`prompt_ids_one`, the device's
    answer, the index from its knob tokens): the same ids and decisions as the batch path."""
    expected_ids = prompt_ids(heldout_batch, controller.buckets, controller.vocabulary)
    expected = controller.select_indices(heldout_batch)
    device = NumpyAsDevice(controller)
    controller.gpu_decoder = device
    try:
        singles = [{key: value[i] for key, value in heldout_batch.items()} for i in range(100)]
        for i, single in enumerate(singles):
            np.testing.assert_array_equal(prompt_ids_one(single, controller.buckets, controller.vocabulary), expected_ids[i : i + 1])
        got = [controller.select_index(single) for single in singles]
        assert len(device.prompts) == 100 and all(p.shape == (1, PROMPT_LENGTH) for p in device.prompts)
        np.testing.assert_array_equal(got, expected)
        assert len(np.unique(expected)) > 5
        bad = dict(singles[0], family=np.int64(len(FAMILY_NAMES)))
        with pytest.raises(ValueError, match=r"family index \[9\] out of range"):
            controller.select_index(bad)
        bad = dict(singles[0], budget_ms=np.array([np.nan], dtype=np.float32))
        with pytest.raises(ValueError, match="non-finite"):
            controller.select_index(bad)
    finally:
        controller.gpu_decoder = None


def test_prompt_ids_one_equals_the_batch_path_at_the_bucket_edges(train_pool):
    """`prompt_ids_one` buckets in plain Python (bisection, float64 as the array path): on the observations the
    buckets were fitted to, whose values include every edge itself, the same ids as `prompt_ids`; likewise
    with every value nudged one float32 step down or up."""
    observations = train_pool[0]
    buckets = FeatureBuckets.fit(observations)
    vocabulary = Vocabulary(n_buckets=buckets.n_buckets)
    n = len(observations["family"])
    for direction in (0.0, -np.inf, np.inf):
        batch = dict(observations)
        if direction:
            for key in ("budget_fraction", "budget_ms", "prompt", "image"):
                batch[key] = np.nextafter(observations[key], np.float32(direction)).astype(np.float32)
        expected = prompt_ids(batch, buckets, vocabulary)
        got = np.concatenate([prompt_ids_one({k: v[i] for k, v in batch.items()}, buckets, vocabulary) for i in range(n)])
        np.testing.assert_array_equal(got, expected)
    # the edges are observed values: each sits exactly on at least one observation's feature
    features = observation_features(observations)[:, len(FAMILY_NAMES):]
    assert all(np.isin(np.float32(e), features[:, f]).all() for f, e in enumerate(buckets.edges))


def test_knob_config_index_of_every_triple_and_a_bad_one(controller):
    vocabulary = controller.vocabulary
    triples = np.stack(np.meshgrid(*vocabulary.knob_ids, indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_array_equal([vocabulary.knob_config_index(t) for t in triples], vocabulary.config_index(triples))
    np.testing.assert_array_equal(vocabulary.config_index(triples), np.arange(len(triples)))
    with pytest.raises(ValueError, match="knob_tokens=.*not a \\(crops, top_k, active_blocks\\) triple"):
        vocabulary.knob_config_index(triples[0][::-1])


def test_format_warm_start_teaches_the_format_only(train_pool, heldout_batch):
    controller = LMController.create(train_pool[0], seed=1)
    result = format_warm_start(controller, train_pool[0], steps=150, seed=0)
    assert result["invalid_before"] == 1.0 and result["invalid_after"] < 0.05
    assert controller.invalid_output_rate(heldout_batch) < 0.05
    # near-uniform over configurations: sampled answers cover much of the grid
    sampled = controller.answers_to_indices(controller.generate(heldout_batch, constrained=False, temperature=1.0,
                                                                rng=np.random.default_rng(0)))
    assert len(np.unique(sampled[sampled >= 0])) > 50


def test_decision_overhead_is_measured_at_batch_1(controller):
    """The measurement, not the speed: how fast a decision is belongs to the benchmarks (M3,
    `results/m3_summary.json`), since a test machine's load moves it (a busy 2-core CI VM measured
    1.56 ms where an idle one measures about 0.4)."""
    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=16)
    overhead = decision_overhead_ms(controller, env, n=300)
    print(f"LM controller decision overhead at batch 1: median {overhead['median_ms']:.3f} ms, p95 {overhead['p95_ms']:.3f} ms")
    assert overhead["n"] == 300 and 0 < overhead["median_ms"] <= overhead["p95_ms"] < float("inf")


# -- save / load ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_save_load_round_trip_gives_identical_decisions(train_pool, heldout_batch, tmp_path, kind):
    controller = random_controller(train_pool, seed=5, kind=kind)
    path = controller.save(tmp_path / "controller")
    assert sorted(p.name for p in path.iterdir()) == [CONTROLLER_FILE, WEIGHTS_FILE]
    record = json.loads((path / CONTROLLER_FILE).read_text())
    assert record["kind"] == kind and {"model_config", "tokenizer", "buckets"} <= set(record["config"])
    loaded = load_controller(path)
    assert isinstance(loaded, LMController) and loaded.kind == kind
    np.testing.assert_array_equal(loaded.select_indices(heldout_batch), controller.select_indices(heldout_batch))
    np.testing.assert_array_equal(loaded.generate(heldout_batch, constrained=False),
                                  controller.generate(heldout_batch, constrained=False))
    assert loaded.render(heldout_batch) == controller.render(heldout_batch)
    assert loaded.tokenizer("family=okvqa config:")["input_ids"] == controller.tokenizer("family=okvqa config:")["input_ids"]
    for key, value in controller.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_knob_choices_script_reports_what_a_controller_chooses(controller, tmp_path):
    """scripts/knob_choices.py: per budget fraction, the share of requests at each knob value (read back from
    the controller's own decisions), the evaluation's retention, and for an LM its first answer token's
    probability over the crops values; a controller that is not an LM gets no such row."""
    knob_choices = load_script("knob_choices")
    controller.save(tmp_path / "lm" / "controller")
    RandomController(seed=0).save(tmp_path / "random")
    out = tmp_path / "choices.json"
    result = knob_choices.main(knob_choices.Args(controllers=(tmp_path / "lm" / "controller", tmp_path / "random"),
                                                 fractions=(0.5, 1.0), requests=20, out=out))
    assert json.loads(out.read_text()) == result and list(result["controllers"]) == ["lm", str(tmp_path / "random")]
    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    heldout = evaluate(controller, env, (0.5, 1.0), 20, 0)["by_fraction"]
    for fraction in ("0.5", "1"):
        row = result["controllers"]["lm"][fraction]
        assert row["quality_retention"] == heldout[fraction]["quality_retention"]
        for knob, values in zip(("crops", "top_k", "active_blocks"), controller.vocabulary.knob_values):
            assert list(row[knob]) == [str(v) for v in values] and sum(row[knob].values()) == pytest.approx(1.0)
        probabilities = row["first_token_crops_probability"]
        assert list(probabilities) == [str(v) for v in controller.vocabulary.knob_values[0]]
        assert 0 < sum(probabilities.values()) <= 1 + 1e-6
        assert "first_token_crops_probability" not in result["controllers"][str(tmp_path / "random")][fraction]
    # the shares are the controller's decisions: at 1.0 the first request's crops value has a share >= 1/20
    observation, _ = env.reset(seed=0, options={"request_id": evaluation_requests(env, 20, 0)[0], "budget_fraction": 1.0})
    first = int(controller.select_action(observation)[0])
    assert result["controllers"]["lm"]["1"]["crops"][str(controller.vocabulary.knob_values[0][first])] >= 1 / 20
    with pytest.raises(ValueError, match="controllers"):
        knob_choices.main(knob_choices.Args(controllers=()))


def test_load_rejects_inconsistent_saves(controller, tmp_path):
    path = controller.save(tmp_path / "controller")
    record = json.loads((path / CONTROLLER_FILE).read_text())
    record["config"]["tokenizer"]["model"]["vocab"]["crops=1"] = 999
    (path / CONTROLLER_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="tokenizer"):
        load_controller(path)
    path = controller.save(tmp_path / "controller2")
    record = json.loads((path / CONTROLLER_FILE).read_text())
    record["config"]["model_config"]["hidden_size"] = 32
    (path / CONTROLLER_FILE).write_text(json.dumps(record))
    with pytest.raises((ValueError, RuntimeError)):
        load_controller(path)


def test_bad_inputs_fail_clearly(controller, heldout_batch, train_pool):
    with pytest.raises(ValueError, match="n_buckets"):
        Vocabulary(n_buckets=1)
    with pytest.raises(ValueError, match="one observation"):
        render_observation(heldout_batch, controller.buckets)
    bad = dict(heldout_batch)
    bad["family"] = np.full(100, 9)
    with pytest.raises(ValueError, match="family"):
        controller.select_indices(bad)
    bad = dict(heldout_batch)
    bad["budget_ms"] = np.full((100, 1), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        prompt_ids(as_batch(bad), controller.buckets, controller.vocabulary)
    with pytest.raises(ValueError, match="kind"):
        LMController(controller.model, controller.buckets, kind="ppo")
    with pytest.raises(ValueError, match="vocab_size"):
        LMController(make_model(Vocabulary(n_buckets=8)), controller.buckets)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        make_model(Vocabulary(), hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="config index"):
        render_config(140)
    with pytest.raises(ValueError, match="rng"):
        controller.generate(heldout_batch, temperature=1.0)
    with pytest.raises(ValueError, match="missing"):
        controller.select_config({"family": 0})


# -- trainers ----------------------------------------------------------------------------------------


def run_cli(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def curves(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "curves.jsonl").read_text().splitlines() if line.strip()]


TINY = {
    "grpo": ["--prompts-per-step", "4", "--num-generations", "4", "--total-env-steps", "48", "--eval-every-env-steps", "16",
             "--format-warmup-steps", "60", "--eval-requests", "10"],
    "dpo": ["--round-env-steps", "16", "--pairs-per-batch", "8", "--total-env-steps", "48", "--eval-every-env-steps", "16",
            "--format-warmup-steps", "60", "--eval-requests", "10"],
}


def trainer_module(method):
    from trainers import dpo, grpo

    return {"dpo": dpo, "grpo": grpo}[method]


@pytest.mark.parametrize("method, argv, message", [
    ("grpo", ["--num-generations", "1"], "num-generations"),
    ("grpo", ["--total-env-steps", "10"], "less than one batch"),
    ("grpo", ["--scale-rewards", "max"], "scale-rewards"),
    ("grpo", ["--lr-scheduler", "step"], "lr-scheduler"),
    ("grpo", ["--learning-rate", "0"], "learning-rate"),
    ("grpo", ["--max-invalid-batches", "-1"], "max-invalid-batches"),
    ("grpo", ["--loss-type", "bogus"], "--loss-type='bogus'; allowed: grpo"),
    ("grpo", ["--env", "NoSuchEnv-v0"], "is not known"),
    ("dpo", ["--candidates", "1"], "candidates"),
    ("dpo", ["--random-candidates", "9"], "random-candidates"),
    ("dpo", ["--round-env-steps", "2"], "round-env-steps"),
    ("dpo", ["--beta", "-1"], "beta"),
    ("dpo", ["--total-env-steps", "0"], "total-env-steps"),
])
def test_bad_arguments_fail_clearly_before_a_run_directory_exists(method, argv, message, tmp_path):
    import tyro

    module = trainer_module(method)
    args = tyro.cli(module.Args, args=["--no-wandb", "--runs-dir", str(tmp_path), *TINY[method], *argv])
    with pytest.raises(ValueError, match=message):
        module.main(args)
    assert not any(tmp_path.iterdir())


def test_cli_bad_argument_exit_code(tmp_path, capsys):
    result = run_cli("grpo", "--no-wandb", "--num-generations", "1", "--runs-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0 and "--num-generations=1 must be >= 2" in result.stderr
    assert not any(tmp_path.iterdir())
    from trainers.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:  # a value tyro cannot parse
        cli_main(["dpo", "--no-wandb", "--candidates", "many", "--runs-dir", str(tmp_path)])
    assert exit_info.value.code != 0 and "candidates" in capsys.readouterr().err


# Not marked slow (about 10 s each): the trainers' smoke runs and learning tests are the evidence
# the controllers issue asks CI to check.
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_cli_smoke_run(method, tmp_path):
    result = run_cli(method, "--no-wandb", "--runs-dir", str(tmp_path), *TINY[method], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    for name in ("args.json", "curves.jsonl", "final.json", "learning_curves.png", "controller"):
        assert (run_dir / name).exists(), name
    final = json.loads((run_dir / "final.json").read_text())
    assert final["method"] == method and set(final["results"]) >= {method, "full", "greedy"}
    assert 0 < final["env_steps"] <= 48
    if method == "grpo":  # the env-step budget, not the optimizer-step bound, ends the run (4 steps per batch)
        assert final["env_steps"] > 48 - 16
        # a Trainer checkpoint, less the TrainingArguments pickle it would hold
        assert list(run_dir.glob("checkpoint/checkpoint-*/trainer_state.json"))
        assert not list(run_dir.rglob("training_args.bin"))
    lines = curves(run_dir)
    steps = [line["env_steps"] for line in lines]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] == final["env_steps"]
    assert "train/unconstrained_invalid_rate" in lines[-1]
    assert lines[-1]["train/policy_reward"] is not None  # the curve every sampling method logs (README)
    assert "method" in result.stdout and f"\n{method} " in result.stdout and "greedy" in result.stdout  # the table
    controller = load_controller(run_dir / "controller")
    assert isinstance(controller, LMController) and controller.kind == method
    assert final["decision_overhead_ms"][method]["median_ms"] > 0


def invalidate_completions(module, monkeypatch, keep) -> None:
    """Make GRPO's reward see each completion for which `keep(call, i)` is false (call: the reward function's
    0-based call, one per generated batch; i: the completion's place in it) as a bare EOS (invalid: no env step)."""
    real = module.EnvReward.__call__
    calls = []

    def invalidated(self, prompts, completions, completion_ids, *rest, **kwargs):
        eos = self.controller.vocabulary.eos_id
        completion_ids = [ids if keep(len(calls), i) else [eos] for i, ids in enumerate(completion_ids)]
        calls.append(1)
        return real(self, prompts, completions, completion_ids, *rest, **kwargs)

    monkeypatch.setattr(module.EnvReward, "__call__", invalidated)


def keep_one_completion_in(n: int, module, monkeypatch) -> None:
    """Every completion but each n-th is invalid."""
    invalidate_completions(module, monkeypatch, lambda call, i: i % n == 0)


def invalidate_after(calls: int, module, monkeypatch) -> None:
    """Every completion is invalid after the reward function's first `calls` calls."""
    invalidate_completions(module, monkeypatch, lambda call, i: call < calls)


def test_grpo_env_step_budget_ends_the_run_when_most_completions_are_invalid(tmp_path, monkeypatch):
    """Invalid completions take no env step, and each generated batch takes num_iterations optimizer steps: with
    three completions in four invalid, the run still spends its env-step budget (it once stopped at an
    optimizer-step bound that ignored num_iterations, a third of the way in, without its final evaluation)."""
    module, args = tiny_args("grpo", tmp_path, total_env_steps=48, eval_every_env_steps=48)
    assert args.num_iterations == 4
    keep_one_completion_in(4, module, monkeypatch)
    final = module.main(args)
    (run_dir,) = tmp_path.iterdir()
    steps = [line["env_steps"] for line in curves(run_dir)]
    # it stops before a batch (16 completions) could pass the budget; the old bound stopped it at 18
    assert 48 - 16 < final["env_steps"] <= 48
    assert steps[-1] == final["env_steps"]


def test_grpo_run_that_reaches_the_optimizer_step_bound_is_evaluated_and_says_so(tmp_path, monkeypatch, capsys):
    """With fifteen completions in sixteen invalid, the env-step budget cannot be spent within TRL's optimizer-step
    bound: the run ends there with a last curve line at the env steps it did spend and a message naming the cause
    (a run of the sweep in results/device/session28 once ended so, at 6,205 of 25,200 env steps, silently)."""
    module, args = tiny_args("grpo", tmp_path, total_env_steps=48, eval_every_env_steps=48)
    assert args.batch_size == 16
    keep_one_completion_in(16, module, monkeypatch)
    final = module.main(args)
    (run_dir,) = tmp_path.iterdir()
    lines = curves(run_dir)
    # at most one env step per generated batch (the kept completion can be invalid too); the bound allows
    # 4 x ceil(48 / 16) + 10 = 22 batches
    assert 0 < final["env_steps"] <= 22 and lines[-1]["env_steps"] == final["env_steps"]
    assert lines[-1]["train/invalid_rate"] > 0.9
    assert "optimizer-step bound" in capsys.readouterr().err


def test_grpo_policy_that_writes_only_invalid_answers_stops_the_run_and_stays_stopped(tmp_path, monkeypatch, capsys):
    """After `max_invalid_batches` generated batches in a row without a valid completion the run ends there: every
    group's rewards are equal, so GRPO cannot recover (a device run once sat at 7,484 of 126,000 env steps for
    minutes, on its way to TRL's optimizer-step bound of 31,544 steps). It is evaluated at the env steps it spent,
    says why, and a resume neither trains it further nor adds a curve line."""
    module, args = tiny_args("grpo", tmp_path, total_env_steps=480, eval_every_env_steps=480, max_invalid_batches=3)
    assert args.batch_size == 16 and args.num_iterations == 4
    invalidate_after(2, module, monkeypatch)
    final = module.main(args)
    (run_dir,) = tmp_path.iterdir()
    lines = curves(run_dir)
    assert 0 < final["env_steps"] <= 32 and [line["env_steps"] for line in lines] == [0, final["env_steps"]]
    # two batches with valid completions, then three without: 5 generated batches x 4 optimizer steps
    assert lines[-1]["train/optimizer_steps"] == 20
    assert "after 3 generated batches in a row (48 completions) without a valid answer" in capsys.readouterr().err
    _, resumed = tiny_args("grpo", tmp_path, total_env_steps=480, eval_every_env_steps=480, max_invalid_batches=3,
                           resume=run_dir)
    again = module.main(resumed)
    assert again["env_steps"] == final["env_steps"] and curves(run_dir) == lines
    assert "stopped after 3 generated batches" in capsys.readouterr().err


def test_grpo_stop_without_an_env_step_since_the_last_evaluation_adds_no_curve_line(tmp_path, monkeypatch):
    """A policy that never writes a valid answer stops at 0 env steps: the curve keeps its one line there
    (one line per env-step count), and final.json still evaluates the final weights."""
    module, args = tiny_args("grpo", tmp_path, max_invalid_batches=2)
    invalidate_after(0, module, monkeypatch)
    final = module.main(args)
    (run_dir,) = tmp_path.iterdir()
    assert final["env_steps"] == 0 and [line["env_steps"] for line in curves(run_dir)] == [0]
    written = json.loads((run_dir / "final.json").read_text())
    assert written["env_steps"] == 0 and math.isfinite(written["results"]["grpo"]["mean"]["reward"])


class Crash(Exception):
    pass


def tiny_args(method, tmp_path, **overrides):
    import tyro

    module = trainer_module(method)
    args = tyro.cli(module.Args, args=["--no-wandb", "--no-baselines", "--runs-dir", str(tmp_path), *TINY[method]])
    args.total_env_steps = 80
    for key, value in overrides.items():
        setattr(args, key, value)
    return module, args


def test_grpo_init_from_a_dpo_controller_starts_from_its_weights(tmp_path):
    """`--init-from` starts GRPO from a saved DPO controller: its first held-out evaluation is the DPO run's final
    one (same weights, requests and seed), no format warm start runs, and the result is saved as a grpo controller."""
    dpo, dpo_args = tiny_args("dpo", tmp_path / "dpo", total_env_steps=32)
    dpo.main(dpo_args)
    (dpo_run,) = (tmp_path / "dpo").iterdir()
    dpo_final = json.loads((dpo_run / "final.json").read_text())["results"]["dpo"]["mean"]["reward"]
    grpo, grpo_args = tiny_args("grpo", tmp_path / "grpo", total_env_steps=32, init_from=dpo_run)  # its controller/
    grpo.main(grpo_args)
    (grpo_run,) = (tmp_path / "grpo").iterdir()
    lines = curves(grpo_run)
    assert lines[0]["env_steps"] == 0 and lines[0]["eval/reward"] == pytest.approx(dpo_final, abs=1e-12)
    assert lines[0]["train/invalid_before"] == lines[0]["train/invalid_after"]  # no warm-start step taken
    assert lines[-1]["env_steps"] > 0
    controller = load_controller(grpo_run / "controller")
    assert controller.kind == "grpo"
    moved = load_controller(dpo_run / "controller").model.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in controller.model.state_dict().items())
    assert json.loads((grpo_run / "args.json").read_text())["init_from"] == str(dpo_run)


def test_init_from_rejects_what_it_cannot_start_from(train_pool, tmp_path):
    RandomController(seed=0).save(tmp_path / "random")
    random_controller(train_pool, kind="dpo").save(tmp_path / "lm")
    cases = [(tmp_path / "none", {}, "is not a saved controller or a run directory holding one"),
             (tmp_path / "random", {}, "holds a 'random' controller"),
             (tmp_path / "lm", {"hidden_size": 32}, r"--hidden-size=32 \(the saved model's is 64\)"),
             (tmp_path / "lm", {"n_buckets": 4}, r"--n-buckets=4 \(the saved model's is")]
    for path, overrides, message in cases:
        module, args = tiny_args("grpo", tmp_path / "runs", init_from=path, **overrides)
        with pytest.raises(ValueError, match=message):
            module.main(args)
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # from the command line: a usage error (exit status 2, one line naming the argument), not a traceback
    result = run_cli("grpo", "--no-wandb", "--init-from", str(tmp_path / "lm"), "--hidden-size", "32",
                     "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --init-from=" in result.stderr and "--hidden-size=32 (the saved model's is 64)" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_resume_continues_without_losing_or_repeating_env_steps(method, tmp_path, monkeypatch):
    """Crash right after the third evaluation is logged (its checkpoint not yet written), resume, and compare with
    an uninterrupted run: the same curve, no env step lost or repeated."""
    module, args = tiny_args(method, tmp_path / "crashed")
    # the function each trainer logs its evaluations through (grpo wraps the shared one)
    hook = "log_evaluation" if hasattr(module, "log_evaluation") else "log_lm_evaluation"
    real = getattr(module, hook)
    calls = []

    def log_then_crash(*a, **k):
        record = real(*a, **k)
        calls.append(record["env_steps"])
        if len(calls) == 3:
            raise Crash
        return record

    monkeypatch.setattr(module, hook, log_then_crash)
    with pytest.raises(Crash):
        module.main(args)
    monkeypatch.setattr(module, hook, real)
    (run_dir,) = (tmp_path / "crashed").iterdir()
    assert len(curves(run_dir)) == 3
    _, resumed = tiny_args(method, tmp_path / "crashed", resume=run_dir)
    final = module.main(resumed)
    _, fresh_args = tiny_args(method, tmp_path / "fresh")
    fresh = module.main(fresh_args)
    (fresh_dir,) = (tmp_path / "fresh").iterdir()
    got, want = curves(run_dir), curves(fresh_dir)
    steps = [line["env_steps"] for line in got]
    assert steps == sorted(set(steps)) and steps == [line["env_steps"] for line in want]
    assert final["env_steps"] == fresh["env_steps"] == steps[-1]
    for a, b in zip(got, want):
        assert a["eval/reward"] == pytest.approx(b["eval/reward"], abs=1e-9)
    assert final["results"][method]["mean"]["reward"] == pytest.approx(fresh["results"][method]["mean"]["reward"], abs=1e-9)


# GRPO runs with the settings the README gives for runs of about 25,000 env steps. With the defaults (tuned for
# E5's 126,000 env steps), a 25,200-step run can end with a policy that barely reads the budget, at seeds that
# depend on the host's floating-point path: seed 0 reached 0.578 on the earlier AMD EPYC sandboxes but 0.522 on
# an AVX-512 AMD EPYC (family 26) on 2026-12-01, and seed 3 ended prompt-blind on the lent H200 machine's CPU
# (results/device/session28). These settings reached 0.558-0.607 at all 8 seeds there (seed 0: 0.583), and
# 0.572 / 0.576 at seeds 0 / 1 on the AVX-512 host.
GRPO_SHORT_RUN = ("--num-iterations", "8", "--learning-rate", "5e-4")


@pytest.mark.parametrize("method, steps, extra", [("dpo", 12_600, ()), ("grpo", 25_200, GRPO_SHORT_RUN)])
def test_learns_to_beat_random_on_heldout_requests(method, steps, extra, tmp_path):
    """A short seeded run on the replay env beats the random controller on held-out mean reward by a clear margin
    (and improves on its own warm-started start: with the shipped micro, GRPO's start is already above
    random, 0.506 vs 0.437 at seed 0; with one optimizer step per generated batch, seeds 1 and 2 ended below
    their starts)."""
    result = run_cli(method, "--no-wandb", "--no-baselines", "--runs-dir", str(tmp_path), "--seed", "0",
                     "--total-env-steps", str(steps), "--eval-every-env-steps", str(steps), "--eval-requests", "300",
                     *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    lines = curves(run_dir)
    heldout = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    random_reward = evaluate(RandomController(seed=0), heldout, FRACTIONS, 300, 0)["mean"]["reward"]
    start, learned = lines[0]["eval/reward"], lines[-1]["eval/reward"]
    print(f"{method}: held-out reward {learned:.3f} after {lines[-1]['env_steps']} env steps "
          f"(start {start:.3f}, random {random_reward:.3f})")
    assert learned > random_reward + 0.08
    assert learned > start + {"dpo": 0.05, "grpo": 0.03}[method]
    assert lines[-1]["train/unconstrained_invalid_rate"] < 0.05


@pytest.mark.slow
def test_dpo_from_profiles_counts_profiled_executions(tmp_path):
    """`--pairs profiles`: each profiled request costs one env step per configuration; pairs prefer the best."""
    module, args = tiny_args("dpo", tmp_path, pairs="profiles", round_env_steps=140, total_env_steps=300,
                             eval_every_env_steps=140)
    final = module.main(args)
    (run_dir,) = tmp_path.iterdir()
    steps = [line["env_steps"] for line in curves(run_dir)]
    assert steps == [0, 140, 280] and final["env_steps"] == 280  # two requests profiled; 20 left over
    assert curves(run_dir)[-1]["train/profiled_requests"] == 2
