"""Re-timing a recorded table on the serving host (`flexvlm_env.latency.retime`, `agents.retime`)."""
from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

import flexvlm_env  # noqa: F401
from agents.base import RandomController, stack_observations
from agents.guardrail import LatencyGuardrail
from agents.lut import LUTController
from agents.ppo import PPOController, build_policy, policy_kwargs
from agents.profiles import ProfileTables
from agents.retime import retime_controller
from agents.supervised import SupervisedController
from baselines import BASELINES, make_baselines
from flexvlm_env.config import Config, KnobGrid
from flexvlm_env.envs.core import FAMILY_NAMES
from flexvlm_env.latency import retime
from flexvlm_env.profiles import load_replay_data
from flexvlm_env.profiles.replay import request_split_mask

SOURCE = "micro-h200-measured"


@pytest.fixture(scope="module")
def profiles() -> ProfileTables:
    """The table's train half with 60 of its 900 residuals per configuration: every guardrail and
    LUT here is rebuilt from profiles, and its quantiles cost in proportion to the residuals."""
    tables = ProfileTables.load(latency=SOURCE, split="train")
    return dataclasses.replace(tables, noise_factor=tables.noise_factor[:, ::15].copy())


@pytest.fixture(scope="module")
def observations():
    """Raw observations of 100 held-out (request, budget) pairs, 20 at each fraction."""
    env = gym.make("FlexVLMReplay-v0", latency=SOURCE, split="heldout", episode_length=1)
    batch = []
    for i in range(100):
        observation, _ = env.reset(seed=i, options={"budget_fraction": (0.35, 0.5, 0.7, 0.85, 1.0)[i % 5]})
        batch.append(observation)
    return stack_observations(batch)


def slower_small_configs(grid: KnobGrid) -> np.ndarray:
    """What E4's live hosts showed: one crop 10% dearer relative to the full configuration, 12 crops 5% cheaper."""
    factor = np.ones(len(grid))
    for c, config in enumerate(grid.configs()):
        factor[c] = 1.10 if config.crops == 1 else 0.95 if config.crops == 12 else 1.0
    factor[len(grid) - 1] = 1.0
    return factor


def controllers(profiles: ProfileTables) -> dict:
    guardrail = LatencyGuardrail.from_profiles(profiles)
    policy_config = policy_kwargs((32,), "tanh")
    policy = build_policy(True, policy_config, profiles.grid)
    torch.manual_seed(0)
    with torch.no_grad():  # random, not near-uniform, weights: decisions vary across requests
        for parameter in policy.parameters():
            parameter.normal_(0.0, 1.0)
    return {
        "maskable_ppo": PPOController(policy, policy_config, True, guardrail, profiles.grid),
        "supervised": SupervisedController.create(profiles, hidden=(16,), seed=0),
        "lut": LUTController.fit(profiles),
        **make_baselines(profiles, guardrail=guardrail),
    }


# -- the factors -----------------------------------------------------------------------------------


def test_host_factors_recover_each_configurations_cost_over_the_budget_reference():
    rng = np.random.default_rng(0)
    recorded = rng.uniform(2.0, 9.0, size=(18, 140))
    true = rng.uniform(0.8, 1.3, size=140)
    reference_ratio = rng.uniform(0.9, 1.1, size=9)  # the host's calibrated budget reference over the table's
    host = recorded * true[None]
    host[3] *= 5.0  # one request timed during a hiccup: the median over requests holds
    factor = retime.host_factors(host, recorded, reference_ratio)
    np.testing.assert_allclose(factor, true[None] / reference_ratio[:, None], rtol=1e-12)


def test_host_residuals_are_each_runs_spread_around_its_configurations_ratio():
    rng = np.random.default_rng(2)
    recorded = rng.uniform(2.0, 9.0, size=(6, 4))
    true = np.array([1.2, 1.0, 0.9, 1.1])
    jitter = rng.lognormal(0.0, 0.1, size=(3, 6, 4))  # 3 passes over 6 requests
    residual = retime.host_residuals(recorded[None] * true * jitter, recorded)
    assert residual.shape == (4, 18)
    expected = jitter.reshape(18, 4) / np.median(jitter.reshape(18, 4), axis=0)
    np.testing.assert_allclose(residual, expected.T, rtol=1e-12)
    np.testing.assert_allclose(np.median(residual, axis=1), 1.0)
    # factors from all the runs: the median ratio per configuration
    np.testing.assert_allclose(retime.host_factors(recorded[None] * true * jitter, recorded, np.ones(2)),
                               np.tile(true * np.median(jitter.reshape(18, 4), axis=0), (2, 1)), rtol=1e-12)


@pytest.mark.parametrize("host, recorded, reference_ratio, message", [
    (np.ones((2, 3)), np.ones((2, 4)), np.ones(9), "same"),
    (np.ones(3), np.ones(3), np.ones(9), "same"),
    (np.zeros((2, 3)), np.ones((2, 3)), np.ones(9), "finite and > 0"),
    (np.ones((2, 3)), np.full((2, 3), np.nan), np.ones(9), "finite and > 0"),
    (np.ones((2, 3)), np.ones((2, 3)), np.zeros(9), "reference_ratio"),
    (np.ones((2, 3)), np.ones((2, 3)), np.ones((9, 1)), "reference_ratio"),
])
def test_host_factors_bad_input_fails_clearly(host, recorded, reference_ratio, message):
    with pytest.raises(ValueError, match=message):
        retime.host_factors(host, recorded, reference_ratio)


@pytest.mark.parametrize("factor, message", [(np.ones(139), r"shape \(139,\)"), (np.ones((9, 139)), r"shape \(9, 139\)"),
                                             (np.zeros(140), "> 0"), (np.full((9, 140), np.inf), "finite")])
def test_bad_factors_fail_clearly(factor, message, profiles):
    with pytest.raises(ValueError, match=message):
        profiles.retimed(factor)
    with pytest.raises(ValueError, match=message):
        LatencyGuardrail.from_profiles(profiles).rescaled(factor)


# -- what they change ------------------------------------------------------------------------------


def test_rescaled_guardrail_is_the_guardrail_of_the_retimed_profiles(profiles):
    factor = np.random.default_rng(1).uniform(0.8, 1.3, size=(len(FAMILY_NAMES), len(profiles.grid)))
    direct = LatencyGuardrail.from_profiles(profiles.retimed(factor))
    np.testing.assert_allclose(LatencyGuardrail.from_profiles(profiles).rescaled(factor).predicted_fraction,
                               direct.predicted_fraction, rtol=1e-12)
    np.testing.assert_array_equal(profiles.retimed(factor).quality, profiles.quality)
    residual = np.random.default_rng(3).lognormal(0.0, 0.1, size=(len(profiles.grid), 36))
    with_residual = profiles.retimed(factor, residual)
    np.testing.assert_array_equal(with_residual.noise_factor, residual)
    np.testing.assert_array_equal(with_residual.latency_ms, profiles.retimed(factor).latency_ms)
    with pytest.raises(ValueError, match="residual has shape"):
        profiles.retimed(factor, residual[:, :, None])
    with pytest.raises(ValueError, match="residual must be finite"):
        profiles.retimed(factor, -residual)


def test_unit_factors_and_the_tables_residuals_change_no_decision(profiles, observations):
    ones = np.ones(len(profiles.grid))
    for name, controller in controllers(profiles).items():
        for residual in (None, profiles.noise_factor):
            retimed = retime_controller(controller, ones, profiles, residual)
            assert retimed is not controller
            np.testing.assert_array_equal(retimed.select_indices(observations), controller.select_indices(observations),
                                          err_msg=name)


def test_retimed_controllers_keep_to_the_hosts_latency(profiles, observations):
    factor = slower_small_configs(profiles.grid)
    host = LatencyGuardrail.from_profiles(profiles.retimed(factor))
    family = observations["family"].reshape(-1)
    budget = observations["budget_fraction"].reshape(-1)
    changed = 0
    for name, controller in controllers(profiles).items():
        before = controller.select_indices(observations)
        retimed = retime_controller(controller, factor, profiles)
        chosen = retimed.select_indices(observations)
        np.testing.assert_array_equal(controller.select_indices(observations), before, err_msg=f"{name} was modified")
        changed += int((chosen != before).sum())
        if name == "lut":  # what a LUT fitted on the host's latencies would choose
            np.testing.assert_array_equal(chosen, LUTController.fit(profiles.retimed(factor)).select_indices(observations))
        elif name in BASELINES:  # what the baseline would choose knowing the host's latencies
            np.testing.assert_array_equal(chosen, make_baselines(profiles, guardrail=host)[name].select_indices(observations))
        else:  # a masked choice fits the host's prediction, or is the family's fastest when nothing does
            assert host.masks(family, budget)[np.arange(len(chosen)), chosen].all(), name
    assert changed > 0  # the 10% dearer single crop moves decisions at the budget's edge


def test_host_residuals_wider_than_the_tables_make_guardrails_stricter(profiles, observations):
    """Serving's spread (live P95 1.17-1.27 of the re-timed prediction on E4's hosts, against the table's 1.04)
    must move the guardrail's quantile: the re-timed guardrail is the one of the re-timed profiles."""
    factor = slower_small_configs(profiles.grid)
    wide = np.tile(np.exp(np.linspace(-0.2, 0.2, 41)), (len(profiles.grid), 1))  # P95 about 1.18
    host = LatencyGuardrail.from_profiles(profiles.retimed(factor, wide))
    narrow = LatencyGuardrail.from_profiles(profiles.retimed(factor)).predicted_fraction
    assert np.median(host.predicted_fraction / narrow) > 1.1
    family = observations["family"].reshape(-1)
    budget = observations["budget_fraction"].reshape(-1)
    for name, controller in controllers(profiles).items():
        retimed = retime_controller(controller, factor, profiles, wide)
        if name in ("maskable_ppo", "supervised") or name in BASELINES:
            np.testing.assert_array_equal(retimed.guardrail.predicted_fraction, host.predicted_fraction, err_msg=name)
        if name in ("maskable_ppo", "supervised"):
            chosen = retimed.select_indices(observations)
            assert host.masks(family, budget)[np.arange(len(chosen)), chosen].all(), name
        if name == "lut":
            np.testing.assert_array_equal(retimed.table, LUTController.fit(profiles.retimed(factor, wide)).table)
    with pytest.raises(ValueError, match="profiles=None"):
        retime_controller(controllers(profiles)["supervised"], factor, None, wide)


def test_retime_refuses_what_it_cannot_retime(profiles):
    ones = np.ones(len(profiles.grid))
    unmasked = PPOController(build_policy(False, policy_kwargs((8,), "tanh"), profiles.grid), policy_kwargs((8,), "tanh"))
    for controller in (unmasked, RandomController()):
        with pytest.raises(ValueError, match="predicts no latency"):
            retime_controller(controller, ones, profiles)
    with pytest.raises(ValueError, match="profiles=None"):
        retime_controller(LUTController.fit(profiles), ones)
    with pytest.raises(ValueError, match="factor has shape"):
        retime_controller(LUTController.fit(profiles), np.ones(3), profiles)


# -- measuring on the host -------------------------------------------------------------------------


def test_time_configurations_times_every_pair(tiny_vlm):
    from flexvlm_env.tasks import load_samples

    samples = load_samples("tally_qa", "procedural", "val", 2, 0)
    configs = [Config(crops=1, top_k=1, active_blocks=1), Config(crops=2, top_k=2, active_blocks=2)]
    times, seconds = retime.time_configurations(tiny_vlm, samples, configs, repeats=2, seed=0)
    assert times.shape == (2, 2, 2) and (times > 0).all() and np.isfinite(times).all()
    assert seconds >= times.sum() / 1e3  # the warm pass and both repeats are in it
    with pytest.raises(ValueError, match="repeats=0"):
        retime.time_configurations(tiny_vlm, samples, configs, repeats=0)
    with pytest.raises(ValueError, match="non-empty"):
        retime.time_configurations(tiny_vlm, [], configs)


class _Env:
    """What `measure_host_factors` reads of a live env: its samples, grid and model."""

    def __init__(self, samples, grid, full_latency_ms=None):
        self.samples, self.grid, self.vlm = samples, grid, None
        self.full_latency_ms = full_latency_ms or {}
        self.unwrapped = self


def test_measure_host_factors_uses_the_tables_train_half(monkeypatch):
    from flexvlm_env.tasks import load_samples

    data = load_replay_data(quality="micro", latency=SOURCE)
    row = {rid: i for i, rid in enumerate(data.request_ids)}
    true = slower_small_configs(data.grid)
    timed = []

    def fake_time(vlm, samples, configs, repeats, seed):  # the host: the table times the true factors, 2 passes
        timed.extend(s.request_id for s in samples)
        recorded = data.total_ms[[row[s.request_id] for s in samples]].astype(np.float64)
        return np.stack([recorded * 1.3 * true[None]] * 2), 1.0

    monkeypatch.setattr(retime, "time_configurations", fake_time)
    samples = [s for family in ("tally_qa", "doc_qa") for s in load_samples(family, "procedural", "val", 20, 0)]
    table_reference = data.family_full_latency_ms()
    # budgets calibrated on the host: tally_qa's reference 1.3x the table's, doc_qa's 1.2x
    calibrated = {"tally_qa": 1.3 * table_reference["tally_qa"], "doc_qa": 1.2 * table_reference["doc_qa"]}
    report = retime.measure_host_factors(_Env(samples, data.grid, calibrated), SOURCE, requests_per_family=3)
    factor = np.asarray(report["factor"])
    reference = {f: 1.3 if f == "tally_qa" else 1.2 if f == "doc_qa" else 1.25 for f in FAMILY_NAMES}  # 1.25: the median
    for i, family in enumerate(FAMILY_NAMES):
        np.testing.assert_allclose(factor[i], 1.3 * true / reference[family], rtol=1e-6, err_msg=family)
        assert report["reference_ratio"][family] == pytest.approx(reference[family])
    assert report["config_ratio_full"] == pytest.approx(1.3)
    assert np.asarray(report["residual"]).shape == (140, 12)  # 2 passes x 6 requests per configuration
    np.testing.assert_allclose(report["residual"], 1.0, rtol=1e-6)
    assert report["latency_source"] == SOURCE
    assert timed == report["requests"] and len(timed) == 6
    train = dict(zip(data.request_ids, request_split_mask(data.request_ids, data.families, "train")))
    assert all(train[rid] for rid in timed)
    assert sorted({rid.split("/")[0] for rid in timed}) == ["doc_qa", "tally_qa"]
    assert set(FAMILY_NAMES) >= {rid.split("/")[0] for rid in timed}
    # a table given as ReplayData (a user's own profiles) is read the same way
    given = retime.measure_host_factors(_Env(samples, data.grid, calibrated), data, requests_per_family=3)
    np.testing.assert_array_equal(given["factor"], report["factor"])
    with pytest.raises(ValueError, match="none of the env's requests"):
        retime.measure_host_factors(_Env(load_samples("tally_qa", "procedural", "train", 2, 0), data.grid), SOURCE)
    with pytest.raises(ValueError, match="grid"):
        retime.measure_host_factors(_Env(samples, KnobGrid(crops=(1, 2))), SOURCE)
    with pytest.raises(ValueError, match="requests_per_family=0"):
        retime.measure_host_factors(_Env(samples, data.grid), SOURCE, requests_per_family=0)
