"""FlexVLM: per-request adaptive inference of MoE vision-language models under latency budgets.

Public API: `load_model(preset, weights=None, device=None, dtype=None)` and `Config`.
Imports are lazy so that light users (task generators, metrics) do not pay for the model code.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Config", "load_model", "__version__"]


def __getattr__(name: str):
    if name == "Config":
        from .config import Config

        return Config
    if name == "load_model":
        from .model.runtime import load_model

        return load_model
    raise AttributeError(f"module 'flexvlm_env' has no attribute {name!r}")
