"""`FlexVLMReplay-v0`: the environment that runs nothing and replays recorded quality and latency.

A step is a few array lookups in a `ReplayData` (flexvlm_env.profiles.replay): the recorded answer
and its quality at the chosen configuration, and the recorded median latency scaled by one of the
recorded repeat residuals. Two classes share one set of precomputed tables: `FlexVLMReplayEnv`
(one episode at a time, at tens of thousands of steps per second) and `FlexVLMReplayVectorEnv`
(the id's `vector_entry_point`: a whole batch of episodes per NumPy operation). Sub-env i of the
vector env seeded s is, transition for transition, the single env seeded s+i: both draw each
episode's plan with the same generator call (see `core`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from ..profiles.replay import ReplayData, request_split_mask
from .core import (
    DEFAULT_BUDGET_FRACTIONS,
    DEFAULT_EPISODE_LENGTH,
    FAMILY_NAMES,
    KNOB_NAMES,
    STAGE_KEYS,
    FlexVLMCoreEnv,
    check_budget_fractions,
    check_families,
    check_positive_int,
    config_dicts,
    draw_episode_plan,
    episode_budgets,
    make_action_space,
    make_observation_space,
    parse_reset_options,
    read_only,
)
from .rewards import QualityMinusOvershoot


def resolve_replay_data(data: ReplayData | None, quality: str, latency: str, requests: str | None = None) -> ReplayData:
    """`data` itself, or the tables named by (`quality`, `latency`, `requests`): shipped names or table paths
    (`flexvlm_env.profiles.load_replay_data`)."""
    if data is not None:
        if not isinstance(data, ReplayData):
            raise ValueError(f"data={type(data).__name__} must be a flexvlm_env.profiles.replay.ReplayData or None")
        return data
    for name, value in (("quality", quality), ("latency", latency)):
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be the name of a shipped table or a table's path (a str)")
    # Imported here: the loader reads Parquet (pandas), which the env's step never needs.
    from ..profiles import load_replay_data

    return load_replay_data(quality=quality, latency=latency, requests=requests)


def _recorded_source(value: str | None, kind: str) -> str | None:
    """A table argument as a recording keeps it: a shipped name, or an own table's absolute path (so that
    `flexvlm-validate` finds it from any directory)."""
    from ..profiles.loading import SHIPPED

    return value if value is None or value in SHIPPED[kind] else str(Path(value).resolve())


class ReplayTables:
    """The arrays a replay step reads, restricted to the requests of `families` and laid out for
    lookups: float64 copies of everything that enters the reward (so the single and the vector env
    do identical float arithmetic) and read-only feature rows that observations copy."""

    def __init__(self, data: ReplayData, families: Sequence[str], split: str = "all"):
        in_split = request_split_mask(data.request_ids, data.families, split)
        pool = [i for i, family in enumerate(data.families) if family in families and in_split[i]]
        if not pool:
            held = sorted(set(data.families))
            if split != "all" and set(families) & set(held):
                total = {f: data.families.count(f) for f in held}
                kept = {f: int(sum(inside for g, inside in zip(data.families, in_split) if g == f)) for f in held}
                raise ValueError(f"split={split!r} leaves families={list(families)} no requests: of the replay data's "
                                 f"requests per family {total}, the {split} half holds {kept} (a family needs 2 or "
                                 "more requests to have both halves)")
            raise ValueError(f"families={list(families)} has no requests in the replay data (it holds {held})")
        index = np.array(pool)
        full_by_family = data.family_full_latency_ms()
        self.data = data
        self.request_ids = tuple(data.request_ids[i] for i in pool)
        self.family_index = np.array([FAMILY_NAMES.index(data.families[i]) for i in pool], dtype=np.int64)
        self.family_names = np.array([data.families[i] for i in pool], dtype=object)
        self.full_latency_ms = np.array([full_by_family[data.families[i]] for i in pool], dtype=np.float64)
        self.prompt = read_only(np.ascontiguousarray(data.prompt_features[index], dtype=np.float32))
        self.image = read_only(np.ascontiguousarray(data.image_features[index], dtype=np.float32))
        self.quality = data.quality[index].astype(np.float64)
        self.answers = data.answers[index]
        self.request_id_array = np.array(self.request_ids, dtype=object)
        self.output_tokens = data.output_tokens[index].astype(np.int64)
        self.total_ms = data.total_ms[index].astype(np.float64)
        self.stage_ms = data.stage_ms[index].astype(np.float64)
        # exp once, in float64, for both envs: latency = median x exp(recorded residual).
        self.noise_factor = np.exp(data.noise_log_ratio.astype(np.float64))
        self.n_residuals = data.noise_log_ratio.shape[1]


class FlexVLMReplayEnv(FlexVLMCoreEnv):
    """Choose an inference configuration per request; quality and latency are replayed from tables.

    **Description.** Each step serves one vision-language request under a latency budget. The
    agent picks a configuration of the model's three knobs (image crops, experts per token,
    active decoder blocks); the environment looks up the answer the model gave at that
    configuration and its quality, and the recorded GPU latency, from a `ReplayData`. Nothing
    runs, so it trains controllers on a laptop at tens of thousands of steps per second.

    **Action space.** `MultiDiscrete(grid.shape)` (7 x 4 x 5 by default): indices into
    `grid.crops`, `grid.top_k`, `grid.active_blocks`. The config index c (row-major position in
    `grid.configs()`) is `(i * 4 + j) * 5 + k`. Actions must be integer arrays of shape (3,);
    other dtypes, shapes or out-of-range indices raise ValueError. `DiscreteKnobs` flattens the
    action to `Discrete(140)` with action masks.

    **Observation space.** A single-level `Dict`: `family` Discrete(9) (order of
    `flexvlm_env.tasks.families.FAMILIES`); `budget_ms` Box(1,); `budget_fraction` Box(1,) (the
    budget over the family's full-configuration latency); `prompt` Box(4,)
    (`flexvlm_env.features.PROMPT_FEATURES`); `image` Box(6,) (`IMAGE_FEATURES`). All float32.

    **Reward.** `quality − λ · max(0, latency − budget) / budget` (`QualityMinusOvershoot`;
    `penalty="squared"` squares the overshoot term). Quality is the family metric in [0, 1].

    **Episode.** `episode_length` requests drawn uniformly with replacement from the pool; each
    request's budget is a fraction drawn from `budget_fractions` times its family's median
    full-configuration latency. `terminated` is True after the last request (never truncated);
    the final observation repeats the last request. `reset(options=...)` pins the first request:
    `request_id` (or `request_index`) and `budget_ms` (or `budget_fraction`). `info` of a step
    holds `config`, `latency` (stage dict: preprocess_ms, vision_encoder_ms, projector_ms,
    prefill_ms, decode_ms, total_ms), `latency_ms`, `quality`, `answer`, `violation`,
    `request_id`, `family`, `budget_ms`, `output_tokens`.

    **Arguments.**

    - `data`: a `ReplayData`; None loads the tables named by `quality`, `latency` and `requests`
      through `flexvlm_env.profiles.load_replay_data`.
    - `split`: "all" (default), "train" or "heldout": a fixed half of each family's recorded
      requests (`flexvlm_env.profiles.replay.request_split_mask`), so that controllers learn from
      one half and are evaluated on the other. Budgets are fractions of the family's
      full-configuration latency over the whole table, whichever half is served.
    - `quality`: which recorded answers/qualities (default "micro": the shipped micro model), or the path of
      a table `flexvlm-profile quality` made (a Parquet file or its shard directory).
    - `latency`: which recorded latencies (default "molmoe-1b-h100": MolmoE-1B on an H100), or the path of
      a table `flexvlm-profile stages` (composed) or `flexvlm-profile requests` (measured) made on your GPU.
    - `requests`: the path of the request table of `quality`'s request pool (`flexvlm-profile
      request-table`); None: the shipped one (the procedural val pool that `flexvlm-profile` profiles by default).
    - `families`: families to serve (default: all nine that the data holds).
    - `budget_fractions`: default (0.35, 0.5, 0.7, 0.85, 1.0).
    - `lam`, `penalty`: the reward's λ (>= 0) and "linear" or "squared".
    - `episode_length`: requests per episode (default 16).
    - `render_mode`: None or "ansi" (a one-line text of the last step).

    **Latency source.** Recorded on a real GPU, then replayed. What each number is, by default
    (`quality="micro", latency="molmoe-1b-h100"`):

    - quality and answer: the shipped `micro` model's greedy answer to the request at that
      configuration (procedural val pool, 200 requests per family, all 140 configurations),
      scored by the family's metric;
    - latency: what `molmoe-1b` (the MolmoE-1B topology, random bf16 weights, FlexVLM's fast
      runtime) takes on an NVIDIA H100 for that request: composed from stage tables measured on
      the H100 (`flexvlm_env.profiles.compose`) using the request's own MolmoE-1B token counts
      (its tiling, its prompt, and micro's answer re-tokenized as the output), which matches
      end-to-end runs of requests the tables never saw within 1.2% median, 6.3% P95
      (`results/replay_latency_validation.json`). `latency="molmoe-1b-h200"`: the same on an
      NVIDIA H200 with the current engine (1.9% median, 5.3% P95 error);
    - `latency="micro-h200"` instead replays the micro model itself on an H200 (same method;
      5.5% median, 15.6% P95 error on the host it was measured on: micro's ~4 ms requests are
      mostly host work, which varies between runs and machines); `latency="micro-h200-measured"`
      replays every (request, configuration) as timed end to end on an H200, with no composition.

    Each step multiplies that median by exp of one recorded residual log(repeat / median) of the
    configuration, drawn with the env's RNG. `data.metadata` names the device, driver, torch,
    dtype, weights and code version that produced every table.

    **Determinism.** Fully deterministic given the seed: the same seed and actions give the same
    requests, budgets, latencies, qualities and rewards on any machine
    (`reward_deterministic=True`, `reward_platform_dependent=False`). Sub-env i of the vector env
    (`gym.make_vec`, either mode) seeded s equals this env seeded s+i.

    **Version history.** v0: initial version.

    Example (the shipped tables):

    >>> import gymnasium as gym
    >>> import flexvlm_env
    >>> env = gym.make("FlexVLMReplay-v0", episode_length=4)
    >>> observation, info = env.reset(seed=0)
    >>> sorted(observation)
    ['budget_fraction', 'budget_ms', 'family', 'image', 'prompt']
    >>> observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    >>> sorted(info["config"])
    ['active_blocks', 'crops', 'top_k']
    >>> 0.0 <= info["quality"] <= 1.0 and info["latency_ms"] > 0
    True
    """

    def __init__(
        self,
        data: ReplayData | None = None,
        quality: str = "micro",
        latency: str = "molmoe-1b-h100",
        families: Sequence[str] | None = None,
        budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
        lam: float = 1.0,
        penalty: str = "linear",
        episode_length: int = DEFAULT_EPISODE_LENGTH,
        render_mode: str | None = None,
        split: str = "all",
        requests: str | None = None,
    ):
        data_given = data is not None
        data = resolve_replay_data(data, quality, latency, requests)
        tables = ReplayTables(data, check_families(families), split)
        self.data = data
        self._tables = tables
        self._setup_core(
            grid=data.grid,
            request_ids=tables.request_ids,
            family_index=tables.family_index,
            full_latency_ms=tables.full_latency_ms,
            budget_fractions=budget_fractions,
            episode_length=episode_length,
            lam=lam,
            penalty=penalty,
            render_mode=render_mode,
            extra_draw_highs=(tables.n_residuals,),
        )
        # One np.int64 per request for the `family` observation (no per-step conversion).
        self._family_obs = list(tables.family_index.astype(np.int64))
        self._init_kwargs = {
            "quality": None if data_given else _recorded_source(quality, "quality"),
            "latency": None if data_given else _recorded_source(latency, "latency"),
            "requests": None if data_given else _recorded_source(requests, "requests"),
            "families": list(check_families(families)),
            "split": split,
            "budget_fractions": list(self.budget_fractions),
            "lam": self.reward_fn.lam,  # a float: a NumPy scalar would reach the JSON as a string
            "penalty": self.reward_fn.penalty,
            "episode_length": self.episode_length,
        }

    def recording_kwargs(self) -> dict[str, Any]:
        """JSON-serializable kwargs that rebuild this env (None for `data` passed as an object:
        the recording then names `data.metadata`, and validation needs the env passed in)."""
        return dict(self._init_kwargs)

    def _on_reset(self) -> None:
        self._residual_index = self._plan[:, 2].tolist()

    def _observation(self, request: int, t: int) -> dict[str, Any]:
        tables = self._tables
        return {
            "budget_fraction": self._budget_fractions[t].copy(),
            "budget_ms": self._budgets_ms[t].copy(),
            "family": self._family_obs[request],
            "image": tables.image[request].copy(),
            "prompt": tables.prompt[request].copy(),
        }

    def _run(self, request: int, config: int, t: int):
        tables = self._tables
        factor = tables.noise_factor[config, self._residual_index[t]]
        latency_ms = float(tables.total_ms[request, config] * factor)
        stage_ms = (tables.stage_ms[request, config] * factor).tolist()
        extra = {"output_tokens": int(tables.output_tokens[request, config])}
        return float(tables.quality[request, config]), tables.answers[request, config], latency_ms, stage_ms, extra


def check_reset_mask(mask: Any, num_envs: int) -> np.ndarray:
    """`options["reset_mask"]` checked as Gymnasium's vector envs check it: a bool array of shape (num_envs,) with a
    True."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (num_envs,) or not mask.any():
        raise ValueError(f"options['reset_mask']={mask!r} must be a numpy bool array of shape ({num_envs},) with at "
                         "least one True (the sub-envs to reset)")
    return mask


class FlexVLMReplayVectorEnv(VectorEnv):
    """`num_envs` replay episodes stepped together with NumPy (`FlexVLMReplay-v0`'s vector entry point).

    Same arguments as `FlexVLMReplayEnv` plus `num_envs`; autoreset is `AutoresetMode.NEXT_STEP`
    (Gymnasium's default: the step after a terminal one resets that sub-env, returns its first
    observation with reward 0, and ignores its action). Sub-env i seeded s is the single env
    seeded s+i, transition for transition, and `info` has the same keys and masks that
    `SyncVectorEnv` builds from the single envs (the tests compare the two exactly).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        data: ReplayData | None = None,
        quality: str = "micro",
        latency: str = "molmoe-1b-h100",
        families: Sequence[str] | None = None,
        budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
        lam: float = 1.0,
        penalty: str = "linear",
        episode_length: int = DEFAULT_EPISODE_LENGTH,
        render_mode: str | None = None,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        split: str = "all",
        requests: str | None = None,
    ):
        self.num_envs = check_positive_int("num_envs", num_envs)
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r} is not supported by the vector env; allowed: None")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            mode = None
        if mode != AutoresetMode.NEXT_STEP:
            raise ValueError(f"autoreset_mode={autoreset_mode!r} is not supported; allowed: AutoresetMode.NEXT_STEP "
                             f"({AutoresetMode.NEXT_STEP.value!r})")
        self.data = resolve_replay_data(data, quality, latency, requests)
        self._tables = ReplayTables(self.data, check_families(families), split)
        self.grid = self.data.grid
        self.budget_fractions = check_budget_fractions(budget_fractions)
        self.episode_length = check_positive_int("episode_length", episode_length)
        self.reward_fn = QualityMinusOvershoot(lam=lam, penalty=penalty)
        self.render_mode = None
        self.single_observation_space = make_observation_space()
        self.single_action_space = make_action_space(self.grid)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        n, length = self.num_envs, self.episode_length
        self._fractions = np.asarray(self.budget_fractions, dtype=np.float64)
        self._draw_highs = np.array([len(self._tables.request_ids), len(self.budget_fractions), self._tables.n_residuals], dtype=np.int64)
        self._nvec = np.array(self.grid.shape, dtype=np.int64)
        self._config_table = np.array([[d[k] for k in KNOB_NAMES] for d in config_dicts(self.grid)], dtype=np.int64)
        self._rows = np.arange(n)
        self._request_index_of = {rid: i for i, rid in enumerate(self._tables.request_ids)}
        self._requests = np.zeros((n, length), dtype=np.int64)
        self._residuals = np.zeros((n, length), dtype=np.int64)
        self._budgets_ms = np.zeros((n, length), dtype=np.float64)
        self._budget_fractions = np.zeros((n, length), dtype=np.float64)
        self._t = np.zeros(n, dtype=np.int64)
        self._needs_reset = np.zeros(n, dtype=bool)
        self._generators: list[np.random.Generator] | None = None

    # -- episodes --------------------------------------------------------------------------

    def _start_episodes(self, envs: np.ndarray, pins: tuple = (None, None, None)) -> None:
        """Draw new episode plans for sub-envs `envs` (one generator call each, as the single env);
        `pins` are parsed reset options (autoresets pass none, as `SyncVectorEnv` does)."""
        length = self.episode_length
        plans = np.empty((len(envs), length, len(self._draw_highs)), dtype=np.int64)
        for row, env in enumerate(envs.tolist()):
            plans[row] = draw_episode_plan(self._generators[env], length, self._draw_highs)
        pinned_request, pinned_ms, pinned_fraction = pins
        requests = plans[:, :, 0]
        if pinned_request is not None:
            requests[:, 0] = pinned_request
        budgets, fractions = episode_budgets(
            requests, plans[:, :, 1], self._fractions, self._tables.full_latency_ms, pinned_ms, pinned_fraction
        )
        self._requests[envs] = requests
        self._residuals[envs] = plans[:, :, 2]
        self._budgets_ms[envs] = budgets
        self._budget_fractions[envs] = fractions
        self._t[envs] = 0

    def reset(self, *, seed: int | Sequence[int] | None = None, options: Mapping[str, Any] | None = None):
        """Reset every sub-env, or those `options["reset_mask"]` marks (Gymnasium's partial reset, as in
        `SyncVectorEnv`). `seed` s seeds sub-env i with s+i (a list gives one seed each); the other options are
        the single env's reset options, applied to each reset sub-env's first request."""
        # Options first: a bad option must not leave the generators half re-seeded.
        mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)
            mask = check_reset_mask(options.pop("reset_mask"), self.num_envs)
            if self._generators is None and not mask.all():
                raise ValueError("options['reset_mask'] resets some sub-envs, but the env was never reset: "
                                 "the first reset() resets them all")
        envs = self._rows if mask is None else np.flatnonzero(mask)
        pins = parse_reset_options(options, self._request_index_of, len(self._tables.request_ids))
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed has {len(seeds)} values for num_envs={self.num_envs}; pass one int, one per env, or None")
        previous = self._generators
        states = None if previous is None else [g.bit_generator.state for g in previous]
        if seed is not None or previous is None:
            generators = list(previous) if previous is not None else [None] * self.num_envs
            for env in envs.tolist():
                if seeds[env] is not None or generators[env] is None:
                    generators[env] = seeding.np_random(seeds[env])[0]
            self._generators = generators
        try:
            self._start_episodes(envs, pins)
        except ValueError:  # a pin out of range for a drawn request: the env stays as it was
            self._generators = previous
            for generator, state in zip(previous or [], states or []):
                generator.bit_generator.state = state
            raise
        self._needs_reset[envs] = False
        requests = self._requests[:, 0]
        reset = np.zeros(self.num_envs, dtype=bool)
        reset[envs] = True
        info = {
            "request_id": self._tables.request_id_array[requests],
            "_request_id": reset.copy(),
            "family": self._tables.family_names[requests],
            "_family": reset.copy(),
            "budget_ms": self._budgets_ms[:, 0].copy(),
            "_budget_ms": reset,
        }
        return self._observe(self._t), info

    def _observe(self, t: np.ndarray) -> dict[str, np.ndarray]:
        rows, tables = self._rows, self._tables
        requests = self._requests[rows, t]
        return {
            "budget_fraction": self._budget_fractions[rows, t].astype(np.float32)[:, None],
            "budget_ms": self._budgets_ms[rows, t].astype(np.float32)[:, None],
            "family": tables.family_index[requests],
            "image": tables.image[requests],
            "prompt": tables.prompt[requests],
        }

    def _config_indices(self, actions) -> np.ndarray:
        actions = np.asarray(actions)
        shape = (self.num_envs, 3)
        if actions.dtype.kind not in "iu":
            raise ValueError(f"actions have dtype {actions.dtype}; they must hold integers (a sample of {self.action_space})")
        if actions.shape != shape:
            raise ValueError(f"actions have shape {actions.shape}; expected {shape}: (crops, top_k, active_blocks) indices per env")
        bad = (actions < 0) | (actions >= self._nvec)
        if bad.any():
            env, knob = np.argwhere(bad)[0]
            raise ValueError(
                f"actions[{env}]={actions[env].tolist()}: {KNOB_NAMES[knob]} index {actions[env, knob]} is out of range; "
                f"allowed: 0..{self._nvec[knob] - 1}"
            )
        return (actions[:, 0] * self._nvec[1] + actions[:, 1]) * self._nvec[2] + actions[:, 2]

    def step(self, actions):
        if self._generators is None:
            raise gym.error.ResetNeeded("step() before reset(): call reset() first")
        configs = self._config_indices(actions)
        resetting = self._needs_reset
        any_reset = bool(resetting.any())
        if any_reset:
            self._start_episodes(np.flatnonzero(resetting))
        tables, rows, t = self._tables, self._rows, self._t
        requests = self._requests[rows, t]
        budget_ms = self._budgets_ms[rows, t]
        factor = tables.noise_factor[configs, self._residuals[rows, t]]
        latency_ms = tables.total_ms[requests, configs] * factor
        quality = tables.quality[requests, configs]
        reward = self.reward_fn(quality, latency_ms, budget_ms)
        t_next = t + 1
        terminated = t_next >= self.episode_length
        served = ~resetting
        if any_reset:
            # Sub-envs that reset on this step served no request (their action is ignored).
            reward[resetting] = 0.0
            terminated[resetting] = False
            t_next[resetting] = 0
        self._t = t_next
        self._needs_reset = terminated
        # After the last request the observation repeats it (as the single env does).
        observation = self._observe(np.minimum(t_next, self.episode_length - 1))
        everyone = np.ones(self.num_envs, dtype=bool)
        info = {
            "request_id": tables.request_id_array[requests],
            "_request_id": everyone,
            "family": tables.family_names[requests],
            "_family": everyone,
            "budget_ms": budget_ms,
            "_budget_ms": everyone,
        }
        if any_reset and not served.any():
            # Every sub-env reset: only the reset keys exist, as when SyncVectorEnv merges infos.
            return observation, reward, terminated, np.zeros(self.num_envs, dtype=bool), info
        stage = tables.stage_ms[requests, configs] * factor[:, None]
        chosen = self._config_table[configs]
        latency = {key: stage[:, i] for i, key in enumerate(STAGE_KEYS)}
        latency["total_ms"] = latency_ms
        for key in STAGE_KEYS + ("total_ms",):
            latency["_" + key] = served
        info.update({
            "config": {"crops": chosen[:, 0], "_crops": served, "top_k": chosen[:, 1], "_top_k": served,
                       "active_blocks": chosen[:, 2], "_active_blocks": served},
            "_config": served,
            "latency": latency,
            "_latency": served,
            "latency_ms": latency_ms,
            "_latency_ms": served,
            "quality": quality,
            "_quality": served,
            "answer": tables.answers[requests, configs],
            "_answer": served,
            "violation": latency_ms > budget_ms,
            "_violation": served,
            "output_tokens": tables.output_tokens[requests, configs],
            "_output_tokens": served,
        })
        return observation, reward, terminated, np.zeros(self.num_envs, dtype=bool), info
