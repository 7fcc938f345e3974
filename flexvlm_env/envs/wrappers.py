"""Wrappers for the FlexVLM environments: a flat masked action space, latency drift, and an episode recorder.

`DiscreteKnobs` turns the `MultiDiscrete(grid.shape)` action into `Discrete(len(grid))` (the
config index, row-major in `grid.configs()`) and exposes `action_masks()` for sb3-contrib's
MaskablePPO; the masks come from a callable such as a latency guardrail. `EpisodeRecorder`
writes every step (request, configuration, budget, stage latencies, quality, answer, reward) to
a Parquet file whose metadata names the env, its arguments, the hardware and the package
versions, so that `flexvlm-validate` (`flexvlm_env.envs.validation`) can replay and check it.
`LatencyDrift` multiplies every step's latency by a factor that changes with the steps served: a
host whose speed moves, to test how controllers (`agents.online`) hold their budgets under drift.
"""
from __future__ import annotations

import bisect
import json
import math
import platform
import time
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .core import STAGE_KEYS, FlexVLMCoreEnv

RECORD_METADATA_KEY = b"flexvlm"
RECORD_COLUMNS = (
    "episode", "step", "request_id", "family", "budget_ms", "config_index", "crops", "top_k", "active_blocks",
    *STAGE_KEYS, "total_ms", "quality", "answer", "violation", "reward", "controller_overhead_ms", "error",
)


class DiscreteKnobs(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Flatten the knob action to `Discrete(len(grid))` and provide MaskablePPO's `action_masks()`.

    Args:
        env: a FlexVLM env (any env whose action space is a 1-D `MultiDiscrete`).
        mask_fn: `mask_fn(env) -> bool[len(grid)]`, called with the wrapped env before each
            action; True marks an allowed configuration. The request the action will answer is
            `env.unwrapped.current_request` (budget, family, id). Default: everything allowed.

    Example:
        >>> import gymnasium as gym, flexvlm_env.envs
        >>> from flexvlm_env.envs.synthetic import synthetic_replay_data
        >>> env = DiscreteKnobs(gym.make("FlexVLMReplay-v0", data=synthetic_replay_data(90)))
        >>> env.action_space
        Discrete(140)
        >>> env.action(139).tolist()  # the full configuration (12 crops, top-8, 16 blocks)
        [6, 3, 4]
        >>> bool(env.reset(seed=0) and env.action_masks().all())
        True
    """

    def __init__(self, env: gym.Env, mask_fn: Callable[[gym.Env], Any] | None = None):
        # RecordConstructorArgs: gymnasium's env checker and `env.spec` rebuild a wrapper from its arguments
        gym.utils.RecordConstructorArgs.__init__(self, mask_fn=mask_fn)
        gym.ActionWrapper.__init__(self, env)
        space = env.action_space
        if not isinstance(space, spaces.MultiDiscrete) or space.nvec.ndim != 1:
            raise ValueError(f"env.action_space={space} must be a 1-D MultiDiscrete (a FlexVLM env's knob action)")
        if mask_fn is not None and not callable(mask_fn):
            raise ValueError(f"mask_fn={mask_fn!r} must be callable as mask_fn(env) -> bool[{int(np.prod(space.nvec))}] or None")
        self.mask_fn = mask_fn
        self.nvec = tuple(int(n) for n in space.nvec)
        self.n_configs = int(np.prod(self.nvec))
        self.action_space = spaces.Discrete(self.n_configs)
        rows = np.stack(np.unravel_index(np.arange(self.n_configs), self.nvec), axis=1).astype(np.int64)
        self._rows = [row for row in rows]
        for row in self._rows:
            row.flags.writeable = False

    def action(self, action) -> np.ndarray:
        """The MultiDiscrete action of config index `action`."""
        if isinstance(action, np.ndarray) and action.shape == () or isinstance(action, np.integer):
            action = action.item() if action.dtype.kind in "iu" else action
        if isinstance(action, bool) or not isinstance(action, int):
            raise ValueError(f"action={action!r} must be an int config index in 0..{self.n_configs - 1}")
        if not 0 <= action < self.n_configs:
            raise ValueError(f"action={action} is out of range; allowed: 0..{self.n_configs - 1}")
        return self._rows[action]

    def action_masks(self) -> np.ndarray:
        """bool[len(grid)]: the configurations the agent may choose for the current request."""
        if self.mask_fn is None:
            return np.ones(self.n_configs, dtype=bool)
        mask = np.asarray(self.mask_fn(self.env))
        if mask.shape != (self.n_configs,) or mask.dtype != np.bool_:
            raise ValueError(f"mask_fn returned dtype {mask.dtype} shape {mask.shape}; expected bool ({self.n_configs},)")
        if not mask.any():
            raise ValueError("mask_fn masked every configuration; at least one must stay allowed")
        return mask


class LatencyDrift(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Each step's latency (total and stages) times the factor of the schedule in force: a serving
    host that slows down or speeds up while it serves. `schedule` is `[(first_step, factor), ...]`
    from step 0, in increasing steps, counted over every `step` call since the wrapper was built
    (across episodes: drift belongs to the host, not to an episode). The step's `violation` and
    `reward` are recomputed from the drifted latency with the env's own reward; `info` also gets
    `drift_factor`. Budgets are not touched: they stay what the host was calibrated to."""

    def __init__(self, env: gym.Env, schedule):
        gym.utils.RecordConstructorArgs.__init__(self, schedule=schedule)
        gym.Wrapper.__init__(self, env)
        try:
            steps = [int(step) for step, _ in schedule]
            factors = [float(factor) for _, factor in schedule]
        except (TypeError, ValueError):
            raise ValueError(f"schedule={schedule!r} must be a sequence of (first_step, factor) pairs") from None
        if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"schedule={schedule!r}: the first steps must start at 0 and increase")
        if not all(math.isfinite(f) and f > 0 for f in factors):
            raise ValueError(f"schedule={schedule!r}: every factor must be a finite number > 0")
        self._steps, self._factors = steps, factors
        self.steps_served = 0

    def factor(self, step: int) -> float:
        """The schedule's factor at `step` (steps served before it)."""
        return self._factors[bisect.bisect_right(self._steps, step) - 1]

    def step(self, action):
        observation, _, terminated, truncated, info = self.env.step(action)
        factor = self.factor(self.steps_served)
        self.steps_served += 1
        latency_ms = float(info["latency_ms"]) * factor
        info = {**info, "latency_ms": latency_ms, "violation": latency_ms > float(info["budget_ms"]), "drift_factor": factor}
        if isinstance(info.get("latency"), dict):
            info["latency"] = {key: float(value) * factor for key, value in info["latency"].items()}
        reward = self.env.unwrapped.reward_fn(float(info["quality"]), latency_ms, float(info["budget_ms"]))
        return observation, reward, terminated, truncated, info


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape a recorded step (None where not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("flexvlm", "gymnasium", "numpy", "torch", "pandas", "pyarrow"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def env_description(env: gym.Env) -> dict[str, Any]:
    """What made the steps of `env`: id, kwargs to rebuild it, reward, hardware, versions."""
    import torch

    from ..benchmarking import device_info

    base = env.unwrapped
    vlm = getattr(base, "vlm", None)
    device = vlm.device if vlm is not None else torch.device("cpu")
    description: dict[str, Any] = {
        "env_id": base.spec.id if base.spec is not None else None,
        "env_class": f"{type(base).__module__}:{type(base).__qualname__}",
        "env_kwargs": base.recording_kwargs() if hasattr(base, "recording_kwargs") else None,
        "reward": repr(getattr(base, "reward_fn", None)),
        "reward_deterministic": getattr(base, "reward_deterministic", None),
        "reward_platform_dependent": getattr(base, "reward_platform_dependent", None),
        "hardware": device_info(device),
        "versions": package_versions(),
        "created_unix_s": time.time(),
    }
    data = getattr(base, "data", None)
    if data is not None and hasattr(data, "metadata"):
        description["replay_data"] = data.metadata  # which device and model the latencies come from
    if vlm is not None:
        description["weights_sha256"] = vlm.weights_sha256
    return description


class EpisodeRecorder(gym.Wrapper):
    """Record every step of a FlexVLM env to Parquet (`RECORD_COLUMNS`, one row per step).

    Rows are kept in memory and the whole file is rewritten by `flush()` and by `close()`, so the
    file on disk is always a complete, readable table. The Parquet metadata key `flexvlm` holds
    JSON from `env_description` (env id and kwargs, reward, hardware fingerprint, versions).

    Args:
        env: a FlexVLM env (possibly wrapped).
        path: the Parquet file to write.
        flush_every: also flush after this many steps (None: only on `flush()`/`close()`).
    """

    def __init__(self, env: gym.Env, path: str | Path, flush_every: int | None = None):
        super().__init__(env)
        if not isinstance(env.unwrapped, FlexVLMCoreEnv):
            raise ValueError(f"env={env} must be a FlexVLM environment (FlexVLM-v0 or FlexVLMReplay-v0)")
        if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1):
            raise ValueError(f"flush_every={flush_every!r} must be an int >= 1 or None")
        self.path = Path(path)
        self.flush_every = flush_every
        self.rows: list[dict[str, Any]] = []
        self._episode = -1
        self._step = 0
        self._description = env_description(env)

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self._episode += 1
        self._step = 0
        return observation, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        config = info["config"]
        latency = info["latency"]
        grid = self.env.unwrapped.grid
        config_index = (
            (grid.crops.index(config["crops"]) * grid.shape[1] + grid.top_k.index(config["top_k"])) * grid.shape[2]
            + grid.active_blocks.index(config["active_blocks"])
        )
        row = {
            "episode": self._episode,
            "step": self._step,
            "request_id": info["request_id"],
            "family": info["family"],
            "budget_ms": info["budget_ms"],
            "config_index": config_index,
            **config,
            **{key: float(latency[key]) for key in STAGE_KEYS},
            "total_ms": float(latency["total_ms"]),
            "quality": float(info["quality"]),
            "answer": str(info["answer"]),
            "violation": bool(info["violation"]),
            "reward": float(reward),
            "controller_overhead_ms": float(info.get("controller_overhead_ms", math.nan)),
            "error": info.get("error"),
        }
        self.rows.append(row)
        self._step += 1
        if self.flush_every is not None and len(self.rows) % self.flush_every == 0:
            self.flush()
        return observation, reward, terminated, truncated, info

    def flush(self) -> Path:
        """Write every row recorded so far to `path` (atomically: a temporary file, then a rename)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        frame = pd.DataFrame(self.rows, columns=list(RECORD_COLUMNS))
        frame["error"] = frame["error"].astype("string")
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), RECORD_METADATA_KEY: json.dumps(self._description, default=str).encode()}
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        pq.write_table(table, partial)
        partial.replace(self.path)
        return self.path

    def close(self):
        self.flush()
        super().close()
