"""The latency guardrail: which configurations a request's budget allows, from profiled latency.

A configuration is allowed when its predicted latency for the request's family (a high quantile
over the family's profiled requests and recorded residuals, `ProfileTables.family_latency_ms`) is
within the budget; when none is, only the family's fastest configuration is, so a mask never
empties. Used as MaskablePPO's action mask (`DiscreteKnobs(mask_fn=guardrail.mask_fn)`), as the
supervised controller's feasibility filter, and by the single-knob baselines.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from flexvlm_env.envs.core import FAMILY_NAMES

from .profiles import DEFAULT_LATENCY_QUANTILE, ProfileTables


class LatencyGuardrail:
    def __init__(self, predicted_ms: np.ndarray, quantile: float = DEFAULT_LATENCY_QUANTILE):
        predicted_ms = np.asarray(predicted_ms, dtype=np.float64)
        if predicted_ms.ndim != 2 or predicted_ms.shape[0] != len(FAMILY_NAMES):
            raise ValueError(f"predicted_ms has shape {predicted_ms.shape}, expected ({len(FAMILY_NAMES)}, n_configs)")
        # Families without profiles: predict the slowest family's latency (conservative).
        fallback = np.nanmax(predicted_ms, axis=0)
        self.predicted_ms = np.where(np.isnan(predicted_ms), fallback[None], predicted_ms)
        self.quantile = quantile
        self._fastest = np.argmin(self.predicted_ms, axis=1)

    @classmethod
    def from_profiles(cls, profiles: ProfileTables, quantile: float = DEFAULT_LATENCY_QUANTILE) -> LatencyGuardrail:
        return cls(profiles.family_latency_ms(quantile), quantile)

    def masks(self, family: np.ndarray, budget_ms: np.ndarray) -> np.ndarray:
        """bool [B, C]: allowed configurations for a batch of (family index, budget ms)."""
        family = np.asarray(family, dtype=np.int64).reshape(-1)
        budget = np.asarray(budget_ms, dtype=np.float64).reshape(-1)
        allowed = self.predicted_ms[family] <= budget[:, None]
        empty = ~allowed.any(axis=1)
        allowed[np.flatnonzero(empty), self._fastest[family[empty]]] = True
        return allowed

    def mask(self, family: str | int, budget_ms: float) -> np.ndarray:
        index = FAMILY_NAMES.index(family) if isinstance(family, str) else int(family)
        return self.masks(np.array([index]), np.array([budget_ms]))[0]

    def mask_fn(self, env: gym.Env) -> np.ndarray:
        """`DiscreteKnobs`'s mask_fn: the mask for the request the env's next action answers."""
        request: Mapping[str, Any] = env.unwrapped.current_request
        return self.mask(request["family"], request["budget_ms"])

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"quantile": self.quantile}, {"guardrail.predicted_ms": torch.from_numpy(self.predicted_ms)}

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, torch.Tensor]) -> LatencyGuardrail:
        return cls(tensors["guardrail.predicted_ms"].numpy(), config["quantile"])
