"""The environments package: checkers, seeding, vector envs, wrappers, rewards, recording.

Replay tests run on a small synthetic `ReplayData` (the shipped tables are tested when present);
live tests run the shipped micro model on the CPU with a handful of requests and given budgets
(one test goes through the calibration path).
"""
from __future__ import annotations

import dataclasses
import doctest
import importlib
import warnings

import gymnasium as gym
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from gymnasium.utils.env_checker import check_env, data_equivalence
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import flexvlm_env.envs
from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import FAMILY_NAMES
from flexvlm_env.envs.live import FlexVLMEnv
from flexvlm_env.envs.replay import FlexVLMReplayEnv, FlexVLMReplayVectorEnv
from flexvlm_env.envs.rewards import QualityMinusOvershoot
from flexvlm_env.envs.synthetic import synthetic_replay_data
from flexvlm_env.envs.validation import main as validate_main
from flexvlm_env.envs.validation import validate
from flexvlm_env.envs.wrappers import (
    RECORD_COLUMNS,
    RECORD_METADATA_KEY,
    DiscreteKnobs,
    EpisodeRecorder,
    LatencyDrift,
)
from flexvlm_env.model.runtime import load_model
from conftest import cpu_threads

LIVE_FAMILIES = ("tally_qa", "okvqa")
LIVE_FULL_MS = {"tally_qa": 60.0, "okvqa": 50.0}


@pytest.fixture(scope="module")
def data():
    return synthetic_replay_data(n_requests=90, seed=0)


@pytest.fixture(scope="module")
def micro():
    torch.set_num_threads(cpu_threads())
    return load_model("micro", device="cpu")


def live_kwargs(micro, **overrides):
    kwargs = {"vlm": micro, "families": LIVE_FAMILIES, "requests_per_family": 2, "full_latency_ms": LIVE_FULL_MS, "episode_length": 3}
    kwargs.update(overrides)
    return kwargs


def rollout(env, seed: int, steps: int, action_seed: int = 0):
    """(observations, rewards, terminations, infos) of `steps` steps with seeded random actions."""
    env.action_space.seed(action_seed)
    observation, info = env.reset(seed=seed)
    out = [(observation, None, None, info)]
    for _ in range(steps):
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert truncated is False
        out.append((observation, reward, terminated, info))
        if terminated:
            observation, info = env.reset()
            out.append((observation, None, None, info))
    return out


# ------------------------------------------------------------------------------------------------
# checkers, registration, determinism


def test_replay_env_passes_gymnasium_and_sb3_checkers(data):
    check_env(gym.make("FlexVLMReplay-v0", data=data).unwrapped)
    sb3_check_env(FlexVLMReplayEnv(data=data, episode_length=2))


def test_live_env_passes_gymnasium_and_sb3_checkers(micro):
    # Made through gym.make so that the checker sees the spec's nondeterministic flag.
    check_env(gym.make("FlexVLM-v0", **live_kwargs(micro)).unwrapped)
    sb3_check_env(FlexVLMEnv(**live_kwargs(micro)))


REGISTERED_KWARGS = {
    "FlexVLM-v0": lambda data, micro: live_kwargs(micro),
    "FlexVLMReplay-v0": lambda data, micro: {"data": data, "episode_length": 4},
}


@pytest.mark.parametrize("env_id", flexvlm_env.envs.ENV_IDS)
def test_every_registered_id_passes_checkers_and_seeded_rollouts_repeat(env_id, data, micro):
    assert env_id in REGISTERED_KWARGS, f"{env_id} is registered but not covered by this test; add its kwargs"
    kwargs = REGISTERED_KWARGS[env_id](data, micro)
    env = gym.make(env_id, **kwargs)
    check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)
    if gym.spec(env_id).nondeterministic:
        pytest.skip(f"{env_id} is registered nondeterministic: no determinism rollout")
    first = rollout(gym.make(env_id, **kwargs), seed=123, steps=10)
    second = rollout(gym.make(env_id, **kwargs), seed=123, steps=10)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert data_equivalence(a, b, exact=True)
    other = rollout(gym.make(env_id, **kwargs), seed=124, steps=10)
    assert [step[3]["request_id"] for step in other] != [step[3]["request_id"] for step in first]


def test_registered_flags_and_import_paths(data):
    assert gym.spec("FlexVLM-v0").nondeterministic is True
    assert gym.spec("FlexVLMReplay-v0").nondeterministic is False
    assert gym.spec("FlexVLMReplay-v0").vector_entry_point == "flexvlm_env.envs.replay:FlexVLMReplayVectorEnv"
    # The module-qualified id imports and registers the package itself.
    env = gym.make("flexvlm_env.envs:FlexVLMReplay-v0", data=data)
    assert isinstance(env.unwrapped, FlexVLMReplayEnv)
    flexvlm_env.envs.register_envs()  # idempotent: registering again neither fails nor duplicates
    assert sum(env_id.startswith("FlexVLM") for env_id in gym.registry) == len(flexvlm_env.envs.ENV_IDS)


def test_reward_flags_follow_the_latency_source(data, micro):
    replay, live = FlexVLMReplayEnv(data=data), FlexVLMEnv(**live_kwargs(micro))
    assert (replay.reward_deterministic, replay.reward_platform_dependent) == (True, False)
    assert (live.reward_deterministic, live.reward_platform_dependent) == (False, True)


def test_live_same_seed_gives_same_requests_and_quality(micro):
    env = FlexVLMEnv(**live_kwargs(micro, episode_length=2))
    actions = [np.array([0, 1, 2]), np.array([6, 3, 4])]
    runs = []
    for _ in range(2):
        _, info = env.reset(seed=5)
        steps = [info["request_id"]]
        for action in actions:
            _, _, _, _, info = env.step(action)
            steps.append((info["request_id"], info["quality"], info["answer"], info["budget_ms"]))
        runs.append(steps)
    assert runs[0] == runs[1]


def test_live_calibration_measures_each_family_and_sets_budgets(micro):
    env = FlexVLMEnv(vlm=micro, families=["tally_qa"], requests_per_family=2, calibration_requests=2)
    assert env.calibration["calibrated"] and env.calibration["requests_per_family"] == 2
    assert set(env.full_latency_ms) == {"tally_qa"} and env.full_latency_ms["tally_qa"] > 0
    observation, _info = env.reset(seed=0, options={"budget_fraction": 0.5})
    assert observation["budget_ms"][0] == pytest.approx(0.5 * env.full_latency_ms["tally_qa"], rel=1e-6)
    # The calibrated values are recorded, so a recording rebuilds the env without recalibrating.
    assert env.recording_kwargs()["full_latency_ms"] == env.full_latency_ms


# ------------------------------------------------------------------------------------------------
# episodes, observations, info, options


def test_replay_step_reads_the_tables(data):
    env = FlexVLMReplayEnv(data=data, episode_length=5)
    rng = np.random.default_rng(0)
    factors = np.exp(data.noise_log_ratio.astype(np.float64))
    env.reset(seed=3)
    for _ in range(5):
        action = rng.integers(0, data.grid.shape)
        request = env.current_request["request_index"]
        _observation, reward, _terminated, _truncated, info = env.step(action)
        config = int(np.ravel_multi_index(action, data.grid.shape))
        expected = data.grid.configs()[config]
        assert info["config"] == {"crops": expected.crops, "top_k": expected.top_k, "active_blocks": expected.active_blocks}
        assert info["quality"] == pytest.approx(float(data.quality[request, config]))
        assert info["answer"] == data.answers[request, config]
        factor = info["latency_ms"] / float(data.total_ms[request, config])
        assert np.isclose(factors[config], factor, rtol=1e-9).any()  # the median x a recorded residual
        stages = np.array([info["latency"][key] for key in ("preprocess_ms", "vision_encoder_ms", "projector_ms", "prefill_ms", "decode_ms")])
        np.testing.assert_allclose(stages, data.stage_ms[request, config] * factor, rtol=1e-6)
        assert info["latency"]["total_ms"] == info["latency_ms"]
        assert info["violation"] == (info["latency_ms"] > info["budget_ms"])
        assert reward == pytest.approx(env.reward_fn(info["quality"], info["latency_ms"], info["budget_ms"]))
        assert info["family"] == data.families[request] and info["request_id"] == data.request_ids[request]


def test_episode_length_budgets_and_termination(data):
    env = FlexVLMReplayEnv(data=data, episode_length=3, budget_fractions=(0.5,))
    observation, _info = env.reset(seed=0)
    full = data.family_full_latency_ms()
    for step in range(3):
        current = env.current_request
        assert current["budget_ms"] == pytest.approx(0.5 * full[current["family"]], rel=1e-6)
        assert observation["budget_fraction"][0] == pytest.approx(0.5)
        assert observation["family"] == FAMILY_NAMES.index(current["family"])
        np.testing.assert_array_equal(observation["prompt"], data.prompt_features[current["request_index"]])
        last = observation
        observation, _, terminated, truncated, _ = env.step(np.array([0, 0, 0]))
        assert terminated == (step == 2) and truncated is False
    assert data_equivalence(observation, last)  # the final observation repeats the last request
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.array([0, 0, 0]))


def test_reset_options_pin_the_first_request(data):
    env = FlexVLMReplayEnv(data=data)
    request_id = data.request_ids[7]
    observation, info = env.reset(seed=0, options={"request_id": request_id, "budget_ms": 42.0})
    assert info["request_id"] == request_id and observation["budget_ms"][0] == pytest.approx(42.0)
    full = data.family_full_latency_ms()[data.families[7]]
    assert observation["budget_fraction"][0] == pytest.approx(42.0 / full, rel=1e-6)
    _, _, _, _, info = env.step(np.array([1, 1, 1]))
    assert info["request_id"] == request_id and info["budget_ms"] == 42.0
    observation, info = env.reset(seed=0, options={"request_index": 11, "budget_fraction": 0.7})
    assert info["request_id"] == data.request_ids[11]
    assert observation["budget_ms"][0] == pytest.approx(0.7 * data.family_full_latency_ms()[data.families[11]], rel=1e-6)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"request": 3}, "request"),
        ({"request_id": "nope/0"}, "request_id"),
        ({"request_index": 90}, "request_index"),
        ({"request_index": 1.0}, "request_index"),
        ({"request_id": "x", "request_index": 0}, "request_id and request_index"),
        ({"budget_ms": -1.0}, "budget_ms"),
        ({"budget_ms": float("nan")}, "budget_ms"),
        ({"budget_fraction": 0}, "budget_fraction"),
        ({"budget_fraction": 1e9}, "budget_fraction"),
        ({"budget_ms": 10.0, "budget_fraction": 0.5}, "budget_ms and budget_fraction"),
        ("request_id", "options"),
    ],
)
def test_bad_reset_options_raise_value_error_naming_the_key(data, options, match):
    with pytest.raises(ValueError, match=match):
        FlexVLMReplayEnv(data=data).reset(seed=0, options=options)
    with pytest.raises(ValueError, match=match):
        FlexVLMReplayVectorEnv(num_envs=2, data=data).reset(seed=0, options=options)


@pytest.mark.parametrize(
    "action, match",
    [
        (np.array([7, 0, 0]), "crops index 7"),
        (np.array([0, 4, 0]), "top_k index 4"),
        (np.array([0, 0, -1]), "active_blocks index -1"),
        (np.array([0, 0]), r"shape \(2,\)"),
        (np.array([[0, 0, 0]]), r"shape \(1, 3\)"),
        (np.array([0.0, 1.0, 2.0]), "dtype float64"),
        (np.array([True, False, True]), "dtype bool"),
        (5, r"shape \(\)"),
    ],
)
def test_bad_actions_raise_value_error(data, action, match):
    env = FlexVLMReplayEnv(data=data)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)
    env.step([1, 2, 3])  # a plain list of ints is a valid action


def test_bad_vector_actions_raise_value_error(data):
    env = FlexVLMReplayVectorEnv(num_envs=2, data=data)
    env.reset(seed=0)
    for actions, match in [
        (np.zeros((3, 3), dtype=np.int64), r"shape \(3, 3\)"),
        (np.zeros((2, 3)), "dtype float64"),
        (np.array([[0, 0, 0], [0, 0, 5]]), r"actions\[1\].*active_blocks index 5"),
    ]:
        with pytest.raises(ValueError, match=match):
            env.step(actions)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"episode_length": 0}, "episode_length"),
        ({"episode_length": 2.5}, "episode_length"),
        ({"budget_fractions": ()}, "budget_fractions"),
        ({"budget_fractions": (0.5, -1.0)}, "budget_fractions"),
        ({"budget_fractions": "abc"}, "budget_fractions"),
        ({"budget_fractions": (0.5, 2000.0)}, r"budget_fractions=\(0.5, 2000.0\) must be .* in \(0, 1000\]"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"penalty": "cubic"}, "penalty"),
        ({"families": ["nope"]}, "families"),
        ({"families": []}, "families"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
def test_bad_kwargs_raise_value_error_naming_the_argument(data, micro, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlexVLMReplayEnv(data=data, **kwargs)
    with pytest.raises(ValueError, match=match):
        FlexVLMEnv(**live_kwargs(micro, **kwargs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "dev"}, "split"),
        ({"requests_per_family": 0}, "requests_per_family"),
        ({"task_seed": -1}, "task_seed"),
        ({"calibration_requests": 0}, "calibration_requests"),
        ({"warmup": "some"}, "warmup"),
        ({"full_latency_ms": {"tally_qa": 60.0}}, "full_latency_ms"),
        ({"full_latency_ms": {"tally_qa": 60.0, "okvqa": -5.0}}, "full_latency_ms"),
        ({"full_latency_ms": [60.0, 50.0]}, "full_latency_ms"),
        ({"grid": KnobGrid(top_k=(1, 2, 128))}, "grid.top_k"),
        ({"grid": (1, 2, 3)}, "grid"),
        ({"vlm": "micro"}, "vlm"),
    ],
)
def test_bad_live_kwargs_raise_value_error(micro, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlexVLMEnv(**live_kwargs(micro, **kwargs))


def test_bad_replay_data_and_vector_kwargs(data):
    with pytest.raises(ValueError, match="data"):
        FlexVLMReplayEnv(data={"quality": 1})
    with pytest.raises(ValueError, match="num_envs"):
        FlexVLMReplayVectorEnv(num_envs=0, data=data)
    with pytest.raises(ValueError, match=r"autoreset_mode='same_step' is not supported; allowed: AutoresetMode.NEXT_STEP "
                                         r"\('NextStep'\)"):
        FlexVLMReplayVectorEnv(num_envs=2, data=data, autoreset_mode="same_step")
    assert FlexVLMReplayVectorEnv(num_envs=2, data=data, autoreset_mode="NextStep").num_envs == 2  # the value it names
    with pytest.raises(ValueError, match="seed"):
        FlexVLMReplayVectorEnv(num_envs=2, data=data).reset(seed=[1, 2, 3])


def test_render_ansi(data):
    env = FlexVLMReplayEnv(data=data, render_mode="ansi")
    env.reset(seed=0)
    assert "awaiting" in env.render()
    _, _, _, _, info = env.step(np.array([6, 3, 4]))
    text = env.render()
    assert info["request_id"] in text and "crops=12" in text


# ------------------------------------------------------------------------------------------------
# live env: failures


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_model_failure_is_reported_and_penalised(micro, monkeypatch, error):
    env = FlexVLMEnv(**live_kwargs(micro, lam=1.0))
    env.reset(seed=0)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(env.vlm, "generate", fail)
    _, reward, terminated, _, info = env.step(np.array([6, 3, 4]))
    assert str(error) in info["error"] and type(error).__name__ in info["error"]
    assert info["quality"] == 0.0 and info["answer"] == ""
    assert info["latency_ms"] == pytest.approx(2 * info["budget_ms"]) and info["violation"]
    assert reward == pytest.approx(-1.0)  # quality 0 - lam * (2b - b) / b
    assert not terminated
    monkeypatch.undo()
    _, _, _, _, info = env.step(np.array([0, 0, 0]))  # the episode goes on, the model works again
    assert "error" not in info and info["latency_ms"] > 0


def test_live_step_info_is_complete(micro):
    env = FlexVLMEnv(**live_kwargs(micro))
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.array([2, 1, 3]))
    assert info["config"] == {"crops": 3, "top_k": 2, "active_blocks": 14}
    assert set(info["latency"]) == {"preprocess_ms", "vision_encoder_ms", "projector_ms", "prefill_ms", "decode_ms", "total_ms"}
    assert info["latency"]["total_ms"] == info["latency_ms"] > 0
    assert 0.0 <= info["quality"] <= 1.0 and isinstance(info["answer"], str)
    assert info["controller_overhead_ms"] > 0 and info["tokens"]["output"] >= 1
    assert info["family"] in LIVE_FAMILIES and info["request_id"].startswith(info["family"] + "/procedural/val/")
    assert reward == pytest.approx(env.reward_fn(info["quality"], info["latency_ms"], info["budget_ms"]))


# ------------------------------------------------------------------------------------------------
# vector envs


def test_sync_and_async_vector_envs_agree(data):
    kwargs = {"data": data, "episode_length": 3}
    sync = gym.make_vec("FlexVLMReplay-v0", num_envs=3, vectorization_mode="sync", **kwargs)
    asynchronous = gym.make_vec("FlexVLMReplay-v0", num_envs=3, vectorization_mode="async", **kwargs)
    try:
        for env in (sync, asynchronous):
            assert env.observation_space["prompt"].shape == (3, 4)
        runs = [rollout_vector(env, seed=9, steps=8) for env in (sync, asynchronous)]
        assert len(runs[0]) == len(runs[1])
        for a, b in zip(*runs):
            assert data_equivalence(a, b, exact=True)
    finally:
        sync.close()
        asynchronous.close()


def rollout_vector(env, seed: int, steps: int):
    env.action_space.seed(0)
    observation, info = env.reset(seed=seed)
    out = [(observation, info)]
    for _ in range(steps):
        out.append(env.step(env.action_space.sample()))
    return out


def test_native_vector_env_equals_sync_vector_env(data):
    """The guarantee: sub-env i of the native vector env seeded s is the single env seeded s+i,
    transition for transition (autoreset steps included), with the infos SyncVectorEnv builds."""
    kwargs = {"data": data, "episode_length": 3}
    native = gym.make_vec("FlexVLMReplay-v0", num_envs=4, vectorization_mode="vector_entry_point", **kwargs)
    sync = gym.make_vec("FlexVLMReplay-v0", num_envs=4, vectorization_mode="sync", **kwargs)
    assert isinstance(native, FlexVLMReplayVectorEnv)
    assert native.observation_space == sync.observation_space and native.action_space == sync.action_space
    native_run, sync_run = rollout_vector(native, seed=11, steps=10), rollout_vector(sync, seed=11, steps=10)
    for (native_obs, native_info), (sync_obs, sync_info) in [(native_run[0], sync_run[0])]:
        assert data_equivalence(native_obs, sync_obs, exact=True)
        assert data_equivalence(native_info, sync_info, exact=True)
    saw_reset = False
    for native_step, sync_step in zip(native_run[1:], sync_run[1:]):
        for a, b in zip(native_step[:4], sync_step[:4]):  # obs, reward, terminated, truncated
            assert data_equivalence(a, b, exact=True)
        assert_masked_infos_equal(native_step[4], sync_step[4])
        saw_reset |= not native_step[4].get("_quality", np.zeros(1, dtype=bool)).all()
    assert saw_reset  # the comparison covered autoreset steps


def assert_masked_infos_equal(native: dict, sync: dict):
    """Equal keys and masks; values equal where the mask says the sub-env reported them."""
    assert {k for k in native if not k.startswith("_")} == {k for k in sync if not k.startswith("_")}
    for key, value in sync.items():
        if key.startswith("_"):
            continue
        mask = sync["_" + key]
        np.testing.assert_array_equal(native["_" + key], mask, err_msg=key)
        if isinstance(value, dict):
            assert_masked_infos_equal(native[key], value)
        else:
            np.testing.assert_array_equal(np.asarray(native[key])[mask], np.asarray(value)[mask], err_msg=key)


def test_native_vector_env_reset_options_and_seeds(data):
    env = FlexVLMReplayVectorEnv(num_envs=3, data=data)
    observation, info = env.reset(seed=[5, 6, 7], options={"request_index": 4, "budget_ms": 33.0})
    assert list(info["request_id"]) == [data.request_ids[4]] * 3
    np.testing.assert_allclose(observation["budget_ms"][:, 0], 33.0)
    single = FlexVLMReplayEnv(data=data)
    for i, seed in enumerate([5, 6, 7]):
        _single_obs, _ = single.reset(seed=seed, options={"request_index": 4, "budget_ms": 33.0})
        action = np.array([i, 1, 2])
        single_step = single.step(action)
        assert single_step[4]["request_id"] == data.request_ids[4]
    vector_step = env.step(np.array([[0, 1, 2], [1, 1, 2], [2, 1, 2]]))
    assert vector_step[1][2] == single_step[1]  # last sub-env (seed 7) equals the single env seeded 7


# ------------------------------------------------------------------------------------------------
# wrappers


def test_discrete_knobs_maps_every_index_to_its_grid_config(data):
    env = DiscreteKnobs(FlexVLMReplayEnv(data=data, episode_length=140))
    assert env.action_space == gym.spaces.Discrete(140)
    configs = data.grid.configs()
    env.reset(seed=0)
    for index in range(140):
        np.testing.assert_array_equal(env.action(index), np.unravel_index(index, data.grid.shape))
        _, _, _, _, info = env.step(np.int64(index))
        expected = configs[index]
        assert info["config"] == {"crops": expected.crops, "top_k": expected.top_k, "active_blocks": expected.active_blocks}
    for bad, match in [(-1, "out of range"), (140, "out of range"), (1.5, "int config index"), ("3", "int config index"), (True, "int config index")]:
        with pytest.raises(ValueError, match=match):
            env.action(bad)


def test_discrete_knobs_masks(data):
    allowed = np.zeros(140, dtype=bool)
    allowed[[3, 50]] = True
    seen = []

    def guardrail(env):
        seen.append(env.unwrapped.current_request["budget_ms"])
        return allowed

    env = DiscreteKnobs(FlexVLMReplayEnv(data=data), mask_fn=guardrail)
    env.reset(seed=0)
    np.testing.assert_array_equal(env.action_masks(), allowed)
    assert seen and seen[0] > 0
    assert DiscreteKnobs(FlexVLMReplayEnv(data=data)).action_masks().all()
    for bad, match in [(np.ones(139, dtype=bool), r"shape \(139,\)"), (np.ones(140), "dtype float64"), (np.zeros(140, dtype=bool), "every")]:
        env = DiscreteKnobs(FlexVLMReplayEnv(data=data), mask_fn=lambda e, bad=bad: bad)
        env.reset(seed=0)
        with pytest.raises(ValueError, match=match):
            env.action_masks()
    with pytest.raises(ValueError, match="mask_fn"):
        DiscreteKnobs(FlexVLMReplayEnv(data=data), mask_fn=[True] * 140)


def test_maskable_ppo_learns_the_best_configuration(data, tmp_path):
    from sb3_contrib import MaskablePPO

    best = 57
    quality = np.full_like(data.quality, 0.2)
    quality[:, best] = 1.0
    learnable = dataclasses.replace(data, quality=quality)
    allowed = np.zeros(140, dtype=bool)
    allowed[np.arange(0, 140, 13)] = True
    allowed[best] = True
    path = tmp_path / "ppo.parquet"
    env = DiscreteKnobs(
        EpisodeRecorder(gym.make("FlexVLMReplay-v0", data=learnable, lam=0.0), path), mask_fn=lambda env: allowed
    )
    torch.manual_seed(0)
    # gamma=0: requests are independent, so each step's value is its own reward.
    model = MaskablePPO("MultiInputPolicy", env, n_steps=64, batch_size=64, learning_rate=3e-3, gamma=0.0, seed=0)
    model.learn(640)
    env.close()
    chosen = pd.read_parquet(path)["config_index"].to_numpy()
    assert len(chosen) >= 640 and allowed[chosen].all()  # masked configurations were never run
    observation, _ = env.reset(seed=1)
    picks = []
    for _ in range(32):
        action, _ = model.predict(observation, action_masks=env.action_masks(), deterministic=True)
        picks.append(int(action))
        observation, _, terminated, _, _ = env.step(action)
        if terminated:
            observation, _ = env.reset()
    assert picks == [best] * 32


# ------------------------------------------------------------------------------------------------
# rewards


def test_reward_known_values():
    linear = QualityMinusOvershoot(lam=2.0)
    assert linear(0.9, 80.0, 100.0) == 0.9
    assert linear(0.9, 100.0, 100.0) == 0.9
    assert linear(0.9, 150.0, 100.0) == pytest.approx(0.9 - 2.0 * 0.5)
    assert linear(0.0, 300.0, 100.0) == pytest.approx(-4.0)
    squared = QualityMinusOvershoot(lam=2.0, penalty="squared")
    assert squared(0.9, 150.0, 100.0) == pytest.approx(0.9 - 2.0 * 0.25)
    assert squared(0.0, 300.0, 100.0) == pytest.approx(-8.0)
    assert QualityMinusOvershoot(lam=0.0)(0.4, 1e6, 1.0) == 0.4
    quality, latency, budget = np.array([0.9, 0.9, 0.0]), np.array([80.0, 150.0, 300.0]), np.full(3, 100.0)
    np.testing.assert_allclose(squared(quality, latency, budget), [squared(*args) for args in zip(quality, latency, budget)])


@pytest.mark.parametrize("kwargs, match", [({"lam": -0.1}, "lam"), ({"lam": "1"}, "lam"), ({"penalty": "quadratic"}, "penalty")])
def test_reward_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QualityMinusOvershoot(**kwargs)


def test_a_split_half_without_requests_says_so():
    tiny = synthetic_replay_data(n_requests=9, seed=0)  # one request per family: the held-out half is empty
    assert FlexVLMReplayEnv(data=tiny, split="train").data is tiny
    with pytest.raises(ValueError, match=r"split='heldout' leaves families=.* no requests: of the replay data's requests "
                                         r"per family \{'coco_2014_vqa': 1, .*the heldout half holds \{'coco_2014_vqa': 0"):
        FlexVLMReplayEnv(data=tiny, split="heldout")


def test_numpy_scalars_are_numbers(data, micro):
    """A value read from a table (NumPy float32 / int64) is as good as a Python number."""
    assert QualityMinusOvershoot(lam=np.float32(0.5)).lam == 0.5
    assert FlexVLMReplayEnv(data=data, lam=np.float32(1.0), episode_length=np.int64(3)).episode_length == 3
    env = FlexVLMEnv(**live_kwargs(micro, task_seed=np.int64(1),
                                   full_latency_ms={f: np.float32(70.0) for f in LIVE_FAMILIES}))
    assert env.recording_kwargs()["task_seed"] == 1 and type(env.recording_kwargs()["task_seed"]) is int


def test_wrappers_pass_the_env_checker(data):
    """gymnasium's checker rebuilds wrappers from their recorded constructor arguments."""
    from agents.features import ScaledObservation

    for wrap in (DiscreteKnobs, lambda env: LatencyDrift(env, [(0, 1.0), (4, 2.0)]), ScaledObservation):
        env = wrap(gym.make("FlexVLMReplay-v0", data=data))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*different from the unwrapped version")
            check_env(env, skip_render_check=True)
        assert env.spec.additional_wrappers[-1].name == type(env).__name__


# ------------------------------------------------------------------------------------------------
# recording and validation


def record(env, path, episodes: int, seed: int = 0):
    recorder = EpisodeRecorder(env, path)
    recorder.action_space.seed(seed)
    for episode in range(episodes):
        recorder.reset(seed=seed + episode)
        terminated = False
        while not terminated:
            _, _, terminated, _, _ = recorder.step(recorder.action_space.sample())
    recorder.close()
    return recorder


def test_recorder_writes_parquet_and_validate_reproduces_replay(data, tmp_path):
    path = tmp_path / "episodes.parquet"
    record(gym.make("FlexVLMReplay-v0", data=data, episode_length=4), path, episodes=3)
    frame = pd.read_parquet(path)
    assert list(frame.columns) == list(RECORD_COLUMNS) and len(frame) == 12
    assert frame["episode"].tolist() == [e for e in range(3) for _ in range(4)]
    metadata = pq.read_schema(path).metadata[RECORD_METADATA_KEY]
    for key in (b'"hardware"', b'"versions"', b'"gymnasium"', b'"FlexVLMReplay-v0"', b'"replay_data"'):
        assert key in metadata
    report = validate(path, env=gym.make("FlexVLMReplay-v0", data=data))
    assert report.reproduced and report.steps == 12
    assert 0.8 < report.latency_ratio_median < 1.25  # resampled residuals around the same median

    # A tampered recording does not validate.
    frame.loc[2, "answer"] = "tampered"
    frame.loc[5, "quality"] = 0.123
    frame.loc[7, "request_id"] = "tally_qa/synthetic/val/9999"
    tampered = tmp_path / "tampered.parquet"
    table = pq.read_table(path)
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata), tampered)
    report = validate(tampered, env=gym.make("FlexVLMReplay-v0", data=data))
    assert not report.reproduced
    assert (report.answer_mismatches, report.quality_mismatches, report.missing_requests) == (1, 1, 1)
    assert "NOT REPRODUCED" in report.summary()


def test_validate_command_replays_a_live_recording(micro, tmp_path, capsys):
    path = tmp_path / "live.parquet"
    record(gym.make("FlexVLM-v0", **live_kwargs(micro, episode_length=2)), path, episodes=1)
    frame = pd.read_parquet(path)
    assert len(frame) == 2 and (frame["controller_overhead_ms"] > 0).all()
    # The command rebuilds FlexVLM-v0 from the recorded kwargs (micro on the CPU, recorded budgets).
    assert validate_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "2/2" in out and "REPRODUCED" in out


def test_validate_command_refuses_a_missing_record_as_a_usage_error(tmp_path, capsys):
    """Exit status 2 (a usage error; 1 means "not reproduced"), naming the file, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        validate_main([str(tmp_path / "none.parquet")])
    assert exit_info.value.code == 2
    assert f"record='{tmp_path / 'none.parquet'}': no such file" in capsys.readouterr().err


def test_validate_command_setup_errors_are_usage_errors(data, tmp_path, capsys):
    """A record, env id or env kwargs that cannot be replayed is exit status 2 with a one-line message
    (nothing was compared); a recording that replays but differs stays exit status 1."""
    import json

    path = tmp_path / "synthetic.parquet"
    record(gym.make("FlexVLMReplay-v0", data=data, episode_length=2), path, episodes=1)
    table = pq.read_table(path)
    description = json.loads(table.schema.metadata[RECORD_METADATA_KEY])
    description["env_kwargs"]["quality"] = str(tmp_path / "moved" / "quality.parquet")  # tables moved away
    moved = tmp_path / "moved.parquet"
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                  RECORD_METADATA_KEY: json.dumps(description).encode()}), moved)
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("not a Parquet file")
    for argv, message in (
        ([str(path), "--env", "NoSuchEnv-v0"], "NoSuchEnv"),
        ([str(path), "--env-kwargs", '{"bogus": 1}'], "unexpected keyword argument 'bogus'"),
        ([str(path), "--env", "CartPole-v1"], "must be a FlexVLM environment"),
        ([str(not_parquet)], "Parquet magic bytes not found"),
        ([str(moved)], f"quality='{tmp_path / 'moved' / 'quality.parquet'}' is neither"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            validate_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert "cannot be replayed (nothing was compared)" in err and message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err  # usage line + one message line
    # Replayed on the shipped tables (the synthetic data cannot be rebuilt from the recording), its
    # requests are missing: a real mismatch, exit status 1.
    assert validate_main([str(path)]) == 1
    assert "NOT REPRODUCED" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# shipped tables and doctests


def test_shipped_replay_tables_pass_the_checkers():
    try:
        from flexvlm_env.profiles import load_replay_data

        shipped = load_replay_data()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"shipped replay tables not available: {error}")
    check_env(gym.make("FlexVLMReplay-v0", data=shipped).unwrapped)
    sb3_check_env(FlexVLMReplayEnv(data=shipped))


@pytest.mark.parametrize(
    "module",
    ["flexvlm_env.envs", "flexvlm_env.envs.rewards", "flexvlm_env.envs.replay", "flexvlm_env.envs.live", "flexvlm_env.envs.wrappers"],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_bench_replay_script_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "throughput.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_replay.py"
    subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--seconds", "0.05", "--repeats", "1", "--num-envs", "8"],
        check=True, capture_output=True, timeout=120,
    )
    results = json.loads(out.read_text())
    assert results["data_source"] == "shipped" and results["num_envs"] == 8
    assert (results["n_requests"], results["n_configs"]) == (1800, 140)
    assert results["single_env_steps_per_s"] > 0 and results["vector_env_steps_per_s"] > 0
    assert {"cpu", "versions", "n_requests", "n_configs"} <= set(results)


def test_spec_make_shares_the_live_model(micro):
    # env.spec.make() (used by check_env and by users re-creating an env) deep-copies the kwargs;
    # the loaded model must be shared, not copied (on CUDA its graphs cannot be copied at all).
    env = gym.make("FlexVLM-v0", **live_kwargs(micro))
    again = env.spec.make()
    assert again.unwrapped.vlm is micro and env.unwrapped.vlm is micro


def test_live_env_runs_in_sync_and_async_vector_envs():
    # Each async worker builds its own model from the arguments (a loaded VLM is not sent to them).
    kwargs = {"device": "cpu", "families": LIVE_FAMILIES, "requests_per_family": 2, "full_latency_ms": LIVE_FULL_MS,
              "episode_length": 2, "warmup": "none"}
    for mode in ("sync", "async"):
        # torch is not fork-safe once its thread pool has run (the sync pass above): spawn workers.
        vector_kwargs = {"context": "spawn"} if mode == "async" else {}
        envs = gym.make_vec("FlexVLM-v0", num_envs=2, vectorization_mode=mode, vector_kwargs=vector_kwargs, **kwargs)
        try:
            observations, _ = envs.reset(seed=3)
            assert observations["family"].shape == (2,)
            _, rewards, terminated, _, infos = envs.step(np.zeros((2, 3), dtype=np.int64))
            assert rewards.shape == (2,) and np.isfinite(rewards).all()
            assert all(0.0 <= q <= 1.0 for q in infos["quality"]) and (infos["latency_ms"] > 0).all()
            assert infos["config"]["crops"].tolist() == [1, 1]  # Gymnasium batches nested info dicts
        finally:
            envs.close()


# ------------------------------------------------------------------------------------------------
# refused resets, partial resets, recordings with NumPy arguments, early checks


def test_a_refused_reset_leaves_the_env_as_it_was(data):
    """A reset refused for its options must not serve a request other than the one observed, nor reseed."""
    env = FlexVLMReplayEnv(data=data, episode_length=4)
    observation, info = env.reset(seed=0)
    twin = FlexVLMReplayEnv(data=data, episode_length=4)
    twin.reset(seed=0)
    with pytest.raises(ValueError, match="over the observable range"):
        env.reset(options={"budget_fraction": 2000.0})  # above the observable range (1e3)
    with pytest.raises(ValueError, match="not known"):
        env.reset(seed=99, options={"nope": 1})
    action = np.array([1, 1, 1])
    assert data_equivalence(env.step(action), twin.step(action), exact=True)  # the episode observed goes on
    assert data_equivalence(env.reset(), twin.reset(), exact=True)  # and the generator was not reseeded


def test_a_refused_vector_reset_leaves_the_generators(data):
    env, twin = FlexVLMReplayVectorEnv(num_envs=3, data=data), FlexVLMReplayVectorEnv(num_envs=3, data=data)
    env.reset(seed=1)
    twin.reset(seed=1)
    with pytest.raises(ValueError, match="over the observable range"):
        env.reset(seed=50, options={"budget_fraction": 2000.0})
    actions = np.array([[1, 1, 1]] * 3)
    assert data_equivalence(env.step(actions), twin.step(actions), exact=True)
    assert data_equivalence(env.reset(), twin.reset(), exact=True)


def test_native_vector_env_partial_reset_equals_sync_vector_env(data):
    """Gymnasium's `reset_mask` option resets only the marked sub-envs, as SyncVectorEnv does."""
    kwargs = {"data": data, "episode_length": 5}
    native = gym.make_vec("FlexVLMReplay-v0", num_envs=3, vectorization_mode="vector_entry_point", **kwargs)
    sync = gym.make_vec("FlexVLMReplay-v0", num_envs=3, vectorization_mode="sync", **kwargs)
    actions = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4]])
    for env in (native, sync):
        env.reset(seed=3)
        env.step(actions)
    mask = np.array([True, False, True])
    native_reset = native.reset(seed=20, options={"reset_mask": mask, "request_index": 7})
    sync_reset = sync.reset(seed=20, options={"reset_mask": mask.copy(), "request_index": 7})
    assert data_equivalence(native_reset[0], sync_reset[0], exact=True)
    assert_masked_infos_equal(native_reset[1], sync_reset[1])
    assert list(native_reset[1]["_request_id"]) == [True, False, True]
    for _ in range(6):  # the kept sub-env finishes its episode and autoresets, the others go on
        native_step, sync_step = native.step(actions), sync.step(actions)
        for a, b in zip(native_step[:4], sync_step[:4]):
            assert data_equivalence(a, b, exact=True)
        assert_masked_infos_equal(native_step[4], sync_step[4])
    fresh = FlexVLMReplayVectorEnv(num_envs=3, data=data)
    with pytest.raises(ValueError, match="never reset"):
        fresh.reset(options={"reset_mask": mask})
    with pytest.raises(ValueError, match=r"reset_mask.*numpy bool array of shape \(3,\)"):
        native.reset(options={"reset_mask": [True, False, True]})


def test_a_recording_made_with_numpy_arguments_validates(data, tmp_path):
    env = EpisodeRecorder(gym.make("FlexVLMReplay-v0", lam=np.float32(0.5), episode_length=2), tmp_path / "rec.parquet")
    env.reset(seed=0)
    env.step(np.array([1, 1, 1]))
    env.close()
    report = validate(tmp_path / "rec.parquet")  # rebuilds the env from the recorded arguments
    assert report.steps == 1 and report.reproduced


def test_the_live_env_checks_its_arguments_before_loading_a_model(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before a cheap argument was checked")

    monkeypatch.setattr("flexvlm_env.envs.live.load_model", no_model)
    for kwargs, message in [({"lam": -1}, "lam"), ({"penalty": "cubic"}, "penalty"), ({"episode_length": 0}, "episode_length"),
                            ({"budget_fractions": [0]}, "budget_fractions"), ({"render_mode": "human"}, "render_mode"),
                            ({"model": "foo"}, "model='foo' is not known")]:
        with pytest.raises(ValueError, match=message):
            FlexVLMEnv(device="cpu", **kwargs)


def test_validate_is_importable_as_a_function_and_bad_request_ids_are_named(data):
    from flexvlm_env.envs import validate as exported

    assert callable(exported) and exported is validate
    with pytest.raises(ValueError, match=r"reset option request_id=\['x'\] is not in this env's request pool"):
        FlexVLMReplayEnv(data=data).reset(options={"request_id": ["x"]})
