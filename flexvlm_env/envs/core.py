"""The core both FlexVLM environments share: spaces, request streams, budgets, options, the step.

An episode is a stream of `episode_length` requests drawn with replacement from a request pool,
each with its own latency budget: a fraction (drawn from `budget_fractions`) of the request
family's full-configuration latency. Everything random about an episode (which requests, which
budget fractions and, for replay, which recorded latency residuals) is drawn in one call at
`reset`, as an `[episode_length, k]` integer plan from the env's `np_random`. That single draw is
what lets the natively vectorized replay env reproduce, draw for draw, what the single env does
(sub-env i seeded s+i is the single env seeded s+i), and it keeps the step free of RNG calls.

A subclass says how one request runs (`_run`: quality, answer, latency) and how a request is
observed (`_observation`); this module owns the spaces, the reset options, the reward and the
`info` layout, so both environments have one API.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..config import KnobGrid
from ..features import PROMPT_FEATURES
from ..model.timing import STAGE_FIELDS
from ..tasks.families import FAMILIES
from .rewards import QualityMinusOvershoot

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)  # the order of the `family` observation
DEFAULT_BUDGET_FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0)
DEFAULT_EPISODE_LENGTH = 16
STAGE_KEYS = STAGE_FIELDS
RESET_OPTIONS = ("request_id", "request_index", "budget_ms", "budget_fraction")
KNOB_NAMES = ("crops", "top_k", "active_blocks")

# ------------------------------------------------------------------------------------------------
# argument checks (shared by every env constructor, so each bad value fails the same way)


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return int(value)


def check_grid(grid: Any) -> KnobGrid:
    if grid is None:
        return KnobGrid()
    if not isinstance(grid, KnobGrid):
        raise ValueError(f"grid={grid!r} must be a flexvlm_env.config.KnobGrid or None (the default 7x4x5 grid)")
    return grid


def check_budget_fractions(budget_fractions: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in budget_fractions)
    except (TypeError, ValueError):
        raise ValueError(f"budget_fractions={budget_fractions!r} must be a sequence of numbers > 0") from None
    if not values or any(not math.isfinite(v) or not 0 < v <= MAX_BUDGET_FRACTION for v in values):
        raise ValueError(f"budget_fractions={budget_fractions!r} must be a non-empty sequence of numbers in "
                         f"(0, {MAX_BUDGET_FRACTION:g}] (the observation's budget_fraction bound)")
    return values


def check_families(families: Any) -> tuple[str, ...]:
    if families is None:
        return FAMILY_NAMES
    if isinstance(families, str):
        families = (families,)
    try:
        families = tuple(families)
    except TypeError:
        raise ValueError(f"families={families!r} must be a sequence of family names or None (all nine)") from None
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(f"families={families!r} must be non-empty names from {list(FAMILY_NAMES)}; unknown: {unknown}")
    # Keep the canonical order so that pools (and hence seeded episodes) do not depend on how the
    # caller happened to order the list.
    return tuple(f for f in FAMILY_NAMES if f in families)


def check_core_arguments(budget_fractions: Any, episode_length: Any, lam: Any, penalty: Any, render_mode: Any,
                         render_modes: Sequence[str]) -> tuple[tuple[float, ...], int, QualityMinusOvershoot, str | None]:
    """(budget fractions, episode length, reward, render mode) as every FlexVLM env takes them, checked. Cheap: the
    live env calls it before it loads a model, so that a typo fails before any request runs."""
    return (check_budget_fractions(budget_fractions), check_positive_int("episode_length", episode_length),
            QualityMinusOvershoot(lam=lam, penalty=penalty), check_render_mode(render_mode, render_modes))


def check_render_mode(render_mode: Any, allowed: Sequence[str]) -> str | None:
    if render_mode is not None and render_mode not in allowed:
        raise ValueError(f"render_mode={render_mode!r} is not supported; allowed: None or one of {list(allowed)}")
    return render_mode


# ------------------------------------------------------------------------------------------------
# spaces and actions


# Finite observation bounds (Gymnasium and SB3 flag infinite ones): generous physical limits.
MAX_BUDGET_MS = 1e7  # about 2.8 hours
MAX_BUDGET_FRACTION = 1e3
PROMPT_HIGH = np.full(len(PROMPT_FEATURES), 1e7, dtype=np.float32)  # chars, words, digits, options
# width px, height px, aspect, contrast, detail, edge fraction (the last three are in [0, 1])
IMAGE_HIGH = np.array([1e6, 1e6, 1e6, 1.0, 1.0, 1.0], dtype=np.float32)


def make_observation_space() -> spaces.Dict:
    """The single-level Dict observation (SB3 MultiInputPolicy-compatible)."""
    return spaces.Dict(
        {
            "family": spaces.Discrete(len(FAMILY_NAMES)),
            "budget_ms": spaces.Box(0.0, MAX_BUDGET_MS, (1,), np.float32),
            "budget_fraction": spaces.Box(0.0, MAX_BUDGET_FRACTION, (1,), np.float32),
            "prompt": spaces.Box(np.zeros_like(PROMPT_HIGH), PROMPT_HIGH, dtype=np.float32),
            "image": spaces.Box(np.zeros_like(IMAGE_HIGH), IMAGE_HIGH, dtype=np.float32),
        }
    )


def make_action_space(grid: KnobGrid) -> spaces.MultiDiscrete:
    return spaces.MultiDiscrete(np.array(grid.shape, dtype=np.int64))


def config_dicts(grid: KnobGrid) -> list[dict[str, int]]:
    """`{crops, top_k, active_blocks}` of every config index (row-major `grid.configs()` order)."""
    return [{"crops": c.crops, "top_k": c.top_k, "active_blocks": c.active_blocks} for c in grid.configs()]


def action_to_config_index(action: Any, grid_shape: tuple[int, int, int]) -> int:
    """Config index of a MultiDiscrete action, or a ValueError saying what is wrong with it.

    Accepts an integer array or sequence of shape (3,): (crops index, top_k index, active_blocks
    index). Floats and bools are refused rather than rounded, so that a policy emitting the wrong
    dtype fails loudly instead of silently choosing a neighbouring configuration.
    """
    array = np.asarray(action)
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"action={action!r} has dtype {array.dtype}; it must hold integers (a MultiDiscrete{list(grid_shape)} sample)"
        )
    if array.shape != (3,):
        raise ValueError(f"action={action!r} has shape {array.shape}; expected (3,): (crops, top_k, active_blocks) indices")
    for name, index, size in zip(KNOB_NAMES, array.tolist(), grid_shape):
        if not 0 <= index < size:
            raise ValueError(f"action={action!r}: {name} index {index} is out of range; allowed: 0..{size - 1}")
    i, j, k = array.tolist()
    return (i * grid_shape[1] + j) * grid_shape[2] + k


def config_index_to_action(index: int, grid_shape: tuple[int, int, int]) -> np.ndarray:
    return np.array(np.unravel_index(index, grid_shape), dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# episodes


def draw_episode_plan(rng: np.random.Generator, episode_length: int, highs: np.ndarray) -> np.ndarray:
    """`[episode_length, len(highs)]` ints, column j uniform in 0..highs[j]-1 (one generator call).

    Column 0 picks the request (a position in the pool), column 1 the budget fraction, further
    columns whatever the latency source needs (replay: the recorded residual)."""
    return rng.integers(0, highs, size=(episode_length, len(highs)))


def episode_budgets(
    requests: np.ndarray,
    fraction_index: np.ndarray,
    fractions: np.ndarray,
    full_latency_ms: np.ndarray,
    pinned_ms: float | None = None,
    pinned_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(budget ms, budget fraction), float64 `[..., L]`: fraction x the family's full-config latency.

    Pins from the reset options apply to the first request (`[..., 0]`). Shared by the single and
    the vectorized env so that both compute budgets with the same float operations."""
    full_ms = full_latency_ms[requests]
    chosen = fractions[fraction_index]
    if pinned_fraction is not None:
        chosen[..., 0] = pinned_fraction
    budgets = chosen * full_ms
    if pinned_ms is not None:
        budgets[..., 0] = pinned_ms
        chosen[..., 0] = pinned_ms / full_ms[..., 0]
    if pinned_ms is not None or pinned_fraction is not None:
        key, value = ("budget_ms", pinned_ms) if pinned_ms is not None else ("budget_fraction", pinned_fraction)
        if np.any(budgets[..., 0] > MAX_BUDGET_MS) or np.any(chosen[..., 0] > MAX_BUDGET_FRACTION):
            raise ValueError(
                f"reset option {key}={value!r} gives a budget over the observable range; allowed: budget_ms <= "
                f"{MAX_BUDGET_MS:g} and budget_fraction <= {MAX_BUDGET_FRACTION:g} of the full-configuration latency"
            )
    return budgets, chosen


def read_only(array: np.ndarray) -> np.ndarray:
    """`array`, marked read-only: observations are views into env tables that must not change."""
    array.flags.writeable = False
    return array


def parse_reset_options(
    options: Mapping[str, Any] | None, request_index_of: Mapping[str, int], n_requests: int
) -> tuple[int | None, float | None, float | None]:
    """(request index, budget ms, budget fraction) pinned for the episode's first request.

    Unknown keys and bad values raise ValueError naming the key, the value and what is allowed."""
    if options is None:
        return None, None, None
    if not isinstance(options, Mapping):
        raise ValueError(f"options={options!r} must be a dict with keys from {list(RESET_OPTIONS)} or None")
    unknown = [key for key in options if key not in RESET_OPTIONS]
    if unknown:
        raise ValueError(f"reset option(s) {unknown} are not known; allowed: {list(RESET_OPTIONS)}")
    if "request_id" in options and "request_index" in options:
        raise ValueError("reset options request_id and request_index both given; pin the request with one of them")
    if "budget_ms" in options and "budget_fraction" in options:
        raise ValueError("reset options budget_ms and budget_fraction both given; pin the budget with one of them")
    request = None
    if "request_id" in options:
        request_id = options["request_id"]
        if not isinstance(request_id, str) or request_id not in request_index_of:
            examples = list(request_index_of)[:3]
            raise ValueError(
                f"reset option request_id={request_id!r} is not in this env's request pool "
                f"({n_requests} requests, ids like {examples})"
            )
        request = request_index_of[request_id]
    if "request_index" in options:
        value = options["request_index"]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n_requests:
            raise ValueError(f"reset option request_index={value!r} must be an int in 0..{n_requests - 1}")
        request = int(value)
    budget_ms = budget_fraction = None
    for key in ("budget_ms", "budget_fraction"):
        if key in options:
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ValueError(f"reset option {key}={value!r} must be a finite number > 0")
            if key == "budget_ms":
                budget_ms = float(value)
            else:
                budget_fraction = float(value)
    return request, budget_ms, budget_fraction


class FlexVLMCoreEnv(gym.Env):
    """Base class of the FlexVLM environments (see the module docstring and the subclasses).

    Subclasses call `_setup_core(...)` in `__init__` and implement `_run(request, config, t)`
    returning `(quality, answer, latency_ms, stage_ms, extra_info)` and `_observation(request, t)`.
    """

    # render_fps only matters to tools that play frames back; "ansi" renders one line per step.
    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    # How the latency the reward sees is produced; the reward's own properties are combined with
    # these in `reward_deterministic` / `reward_platform_dependent` (CompilerGym's reward flags).
    latency_deterministic: bool = True
    latency_platform_dependent: bool = False

    def _setup_core(
        self,
        *,
        grid: KnobGrid,
        request_ids: Sequence[str],
        family_index: np.ndarray,
        full_latency_ms: np.ndarray,
        budget_fractions: Sequence[float],
        episode_length: int,
        lam: float,
        penalty: str,
        render_mode: str | None,
        extra_draw_highs: Sequence[int] = (),
    ) -> None:
        self.grid = check_grid(grid)
        self.budget_fractions, self.episode_length, self.reward_fn, self.render_mode = check_core_arguments(
            budget_fractions, episode_length, lam, penalty, render_mode, self.metadata["render_modes"])
        self.observation_space = make_observation_space()
        self.action_space = make_action_space(self.grid)
        self.request_ids = tuple(request_ids)
        self.request_index_of = {rid: i for i, rid in enumerate(self.request_ids)}
        self._family_index = np.asarray(family_index, dtype=np.int64)
        self._full_latency_ms = np.asarray(full_latency_ms, dtype=np.float64)
        self._fractions = np.asarray(self.budget_fractions, dtype=np.float64)
        self._grid_shape = self.grid.shape
        self._config_dicts = config_dicts(self.grid)
        self._draw_highs = np.array([len(self.request_ids), len(self.budget_fractions), *extra_draw_highs], dtype=np.int64)
        self._plan: np.ndarray | None = None
        self._t = 0
        self._last_step: dict | None = None

    # -- properties users and wrappers read --------------------------------------------------

    @property
    def reward_deterministic(self) -> bool:
        """Whether the same seed and actions give the same rewards (False when latency is measured)."""
        return self.reward_fn.deterministic and self.latency_deterministic

    @property
    def reward_platform_dependent(self) -> bool:
        """Whether rewards depend on the machine running the env (True when latency is measured)."""
        return self.reward_fn.platform_dependent or self.latency_platform_dependent

    @property
    def current_request(self) -> dict[str, Any]:
        """The request the next action answers: index, id, family, budget (for masks/guardrails)."""
        if self._plan is None:
            raise gym.error.ResetNeeded("no episode yet: call reset() first")
        t = min(self._t, self.episode_length - 1)
        r = int(self._requests[t])
        return {
            "request_index": r,
            "request_id": self.request_ids[r],
            "family": FAMILY_NAMES[self._family_index[r]],
            "budget_ms": float(self._budgets_ms[t, 0]),
            "budget_fraction": float(self._budget_fractions[t, 0]),
            "step": self._t,
        }

    # -- the API -------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None):
        # A refused reset leaves the env as it was (its generator, its episode): options are read first, and a pin
        # that only the drawn request shows to be out of range puts the generator back.
        pinned_request, pinned_ms, pinned_fraction = parse_reset_options(options, self.request_index_of, len(self.request_ids))
        generator, generator_seed = self._np_random, self._np_random_seed
        generator_state = None if generator is None else generator.bit_generator.state
        super().reset(seed=seed)
        plan = draw_episode_plan(self.np_random, self.episode_length, self._draw_highs)
        requests = plan[:, 0].copy()
        if pinned_request is not None:
            requests[0] = pinned_request
        try:
            budgets, fractions = episode_budgets(
                requests, plan[:, 1], self._fractions, self._full_latency_ms, pinned_ms, pinned_fraction
            )
        except ValueError:
            self._np_random, self._np_random_seed = generator, generator_seed
            if generator is not None:
                generator.bit_generator.state = generator_state
            raise
        self._plan = plan
        self._requests = requests
        # [L, 1] float32: row t is the observation's Box(1,) value (copied into each observation).
        self._budgets_ms = read_only(budgets.astype(np.float32)[:, None])
        self._budget_fractions = read_only(fractions.astype(np.float32)[:, None])
        self._budgets_ms_f64 = budgets
        self._t = 0
        self._last_step = None
        self._on_reset()
        observation = self._observation(int(self._requests[0]), 0)
        self._last_observation = observation
        r = int(self._requests[0])
        info = {"request_id": self.request_ids[r], "family": FAMILY_NAMES[self._family_index[r]], "budget_ms": float(budgets[0])}
        return observation, info

    def step(self, action):
        if self._plan is None:
            raise gym.error.ResetNeeded("step() before reset(): call reset() first")
        t = self._t
        if t >= self.episode_length:
            raise gym.error.ResetNeeded(f"the episode ended after {self.episode_length} requests: call reset()")
        # Fast path for the common case (an int64 array from a policy or action_space.sample());
        # anything else goes through the checked conversion, which names what is wrong.
        shape = self._grid_shape
        if type(action) is np.ndarray and action.shape == (3,) and action.dtype.kind in "iu":
            i, j, k = action.tolist()
            if 0 <= i < shape[0] and 0 <= j < shape[1] and 0 <= k < shape[2]:
                config = (i * shape[1] + j) * shape[2] + k
            else:
                config = action_to_config_index(action, shape)
        else:
            config = action_to_config_index(action, shape)
        request = int(self._requests[t])
        budget_ms = float(self._budgets_ms_f64[t])
        quality, answer, latency_ms, stage_ms, extra = self._run(request, config, t)
        reward = self.reward_fn(quality, latency_ms, budget_ms)
        self._t = t + 1
        terminated = self._t >= self.episode_length
        if terminated:
            # There is no next request: the last observation is repeated (never acted on), as new
            # arrays, since users may keep and modify what each call returns.
            self._last_observation = {
                key: value.copy() if isinstance(value, np.ndarray) else value for key, value in self._last_observation.items()
            }
        else:
            self._last_observation = self._observation(int(self._requests[self._t]), self._t)
        latency = dict(zip(STAGE_KEYS, stage_ms))
        latency["total_ms"] = latency_ms
        info = {
            "request_id": self.request_ids[request],
            "family": FAMILY_NAMES[self._family_index[request]],
            "budget_ms": budget_ms,
            "config": dict(self._config_dicts[config]),
            "latency": latency,
            "latency_ms": latency_ms,
            "quality": quality,
            "answer": answer,
            "violation": latency_ms > budget_ms,
        }
        if extra:
            info.update(extra)
        if self.render_mode is not None:
            self._last_step = info
        return self._last_observation, reward, terminated, False, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        if self._plan is None:
            return "FlexVLM: no episode yet (call reset())"
        if self._last_step is None:
            current = self.current_request
            return f"request {current['request_id']} budget {current['budget_ms']:.1f} ms: awaiting a configuration"
        s = self._last_step
        c = s["config"]
        return (
            f"step {self._t}/{self.episode_length} {s['request_id']} crops={c['crops']} top_k={c['top_k']} "
            f"blocks={c['active_blocks']}: quality {s['quality']:.3f}, latency {s['latency_ms']:.1f} ms / "
            f"budget {s['budget_ms']:.1f} ms{' VIOLATION' if s['violation'] else ''}, answer {s['answer']!r}"
        )

    # -- subclass hooks ------------------------------------------------------------------------

    def _on_reset(self) -> None:
        """Called after a new episode plan is drawn (the live env resets per-episode state here)."""

    def _observation(self, request: int, t: int) -> dict[str, Any]:
        raise NotImplementedError

    def _run(self, request: int, config: int, t: int) -> tuple[float, str, float, Sequence[float], dict | None]:
        raise NotImplementedError
