"""The registered environment ids: a flat, versioned list with string entry points.

String entry points keep registration cheap (nothing heavy is imported until an env is made).
Gymnasium 1.x has no plugin discovery (the `gymnasium.envs` entry-point group that gym 0.26 and
gymnasium 0.x read was removed in 1.0), so the ids exist once `flexvlm_env.envs` is imported:
`import flexvlm_env.envs`, `gym.register_envs(flexvlm_env.envs)`, or the module-qualified id
`gym.make("flexvlm_env.envs:FlexVLM-v0")`, which imports it for you.
"""
from __future__ import annotations

import gymnasium as gym

ENVS: tuple[dict, ...] = (
    {
        "id": "FlexVLM-v0",
        "entry_point": "flexvlm_env.envs.live:FlexVLMEnv",
        # Latency is measured on the local device: the same seed gives different rewards.
        "nondeterministic": True,
    },
    {
        "id": "FlexVLMReplay-v0",
        "entry_point": "flexvlm_env.envs.replay:FlexVLMReplayEnv",
        "vector_entry_point": "flexvlm_env.envs.replay:FlexVLMReplayVectorEnv",
        "nondeterministic": False,
    },
)

ENV_IDS: tuple[str, ...] = tuple(spec["id"] for spec in ENVS)


def register_envs() -> None:
    """Register every id in `ENVS` with Gymnasium (ids already registered are left alone)."""
    for spec in ENVS:
        if spec["id"] not in gym.registry:
            gym.register(**spec)
