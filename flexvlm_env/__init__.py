"""FlexVLM: per-request adaptive inference of MoE vision-language models under latency budgets.

Public API: `load_model(preset, weights=None, device=None, dtype=None)`, `Config`, and the
Gymnasium ids `FlexVLM-v0` / `FlexVLMReplay-v0` (registered on import). Imports are lazy so that
light users (task generators, metrics) do not pay for the model code.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Config", "load_model", "__version__"]

# `import flexvlm_env` registers FlexVLM-v0 and FlexVLMReplay-v0 with Gymnasium (string entry
# points: nothing heavy is imported until an env is made). Gymnasium 1.x has no plugin discovery,
# so this import, or the qualified id gym.make("flexvlm_env:FlexVLM-v0"), is what makes the ids known.
from .envs.registration import register_envs as _register_envs  # noqa: E402

_register_envs()


def __getattr__(name: str):
    if name == "Config":
        from .config import Config

        return Config
    if name == "load_model":
        from .model.runtime import load_model

        return load_model
    raise AttributeError(f"module 'flexvlm_env' has no attribute {name!r}")
