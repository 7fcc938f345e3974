"""The FlexVLM environments: `FlexVLM-v0` (the model runs live) and `FlexVLMReplay-v0` (recorded).

Importing this package registers both ids with Gymnasium; the env classes, wrappers and rewards
are imported on first use, so registering costs only Gymnasium itself.

    >>> import gymnasium as gym
    >>> import flexvlm_env.envs
    >>> sorted(env_id for env_id in gym.registry if env_id.startswith("FlexVLM"))
    ['FlexVLM-v0', 'FlexVLMReplay-v0']
"""
from __future__ import annotations

from importlib import import_module

from .registration import ENV_IDS, ENVS, register_envs

register_envs()

_LAZY = {
    "FlexVLMEnv": ".live",
    "FlexVLMReplayEnv": ".replay",
    "FlexVLMReplayVectorEnv": ".replay",
    "QualityMinusOvershoot": ".rewards",
    "DiscreteKnobs": ".wrappers",
    "EpisodeRecorder": ".wrappers",
    "LatencyDrift": ".wrappers",
    "validate": ".validation",  # not a module named validate: `from flexvlm_env.envs import validate` would get it
    "synthetic_replay_data": ".synthetic",
}

__all__ = [
    "ENVS",
    "ENV_IDS",
    "DiscreteKnobs",
    "EpisodeRecorder",
    "FlexVLMEnv",
    "FlexVLMReplayEnv",
    "FlexVLMReplayVectorEnv",
    "LatencyDrift",
    "QualityMinusOvershoot",
    "register_envs",
    "synthetic_replay_data",
    "validate",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'flexvlm_env.envs' has no attribute {name!r}")
