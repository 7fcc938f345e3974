"""The latency guardrail: which configurations a request's budget allows, from profiled latency.

A configuration is allowed when its predicted latency for the request's family (a high quantile
over the family's profiled requests and recorded residuals, `ProfileTables.family_latency_fraction`)
is within the budget; when none is, only the family's fastest configuration is, so a mask never
empties. Predictions and budgets are both fractions of the family's full-configuration latency:
on the device the profiles came from this is the same test as in milliseconds, and on another
device (the live env on a CPU, say) the relative costs of the configurations carry over where
absolute milliseconds would not. Used as MaskablePPO's action mask (`DiscreteKnobs(mask_fn=guardrail.mask_fn)`), as the
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


# float32 observations of a fraction like 0.35 may sit a hair below it
_BUDGET_TOLERANCE = 1e-6


class LatencyGuardrail:
    def __init__(self, predicted_fraction: np.ndarray, quantile: float = DEFAULT_LATENCY_QUANTILE):
        predicted = np.asarray(predicted_fraction, dtype=np.float64)
        if predicted.ndim != 2 or predicted.shape[0] != len(FAMILY_NAMES):
            raise ValueError(f"predicted_fraction has shape {predicted.shape}, expected ({len(FAMILY_NAMES)}, n_configs)")
        # Families without profiles: predict the slowest family's latency (conservative).
        fallback = np.nanmax(predicted, axis=0)
        self.predicted_fraction = np.where(np.isnan(predicted), fallback[None], predicted)
        self.quantile = quantile
        self._fastest = np.argmin(self.predicted_fraction, axis=1)

    @classmethod
    def from_profiles(cls, profiles: ProfileTables, quantile: float = DEFAULT_LATENCY_QUANTILE) -> LatencyGuardrail:
        return cls(profiles.family_latency_fraction(quantile), quantile)

    def masks(self, family: np.ndarray, budget_fraction: np.ndarray) -> np.ndarray:
        """bool [B, C]: allowed configurations for a batch of (family index, budget fraction)."""
        family = np.asarray(family, dtype=np.int64).reshape(-1)
        budget = np.asarray(budget_fraction, dtype=np.float64).reshape(-1, 1)
        allowed = self.predicted_fraction[family] <= budget + _BUDGET_TOLERANCE
        some = allowed.any(axis=1)
        if not some.all():  # tested first: the fix-up's indexing is most of a batch-1 call's cost
            empty = np.flatnonzero(~some)
            allowed[empty, self._fastest[family[empty]]] = True
        return allowed

    def mask(self, family: str | int, budget_fraction: float) -> np.ndarray:
        """bool [C]: `masks` of one request (family name or index)."""
        index = FAMILY_NAMES.index(family) if isinstance(family, str) else int(family)
        allowed = self.predicted_fraction[index] <= float(budget_fraction) + _BUDGET_TOLERANCE
        if not allowed.any():
            allowed[self._fastest[index]] = True
        return allowed

    def mask_fn(self, env: gym.Env) -> np.ndarray:
        """`DiscreteKnobs`'s mask_fn: the mask for the request the env's next action answers."""
        request: Mapping[str, Any] = env.unwrapped.current_request
        return self.mask(request["family"], request["budget_fraction"])

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"quantile": self.quantile}, {"guardrail.predicted_fraction": torch.from_numpy(self.predicted_fraction)}

    @classmethod
    def from_state(cls, config: dict, tensors: Mapping[str, torch.Tensor]) -> LatencyGuardrail:
        return cls(tensors["guardrail.predicted_fraction"].numpy(), config["quantile"])

    @classmethod
    def from_estimator(cls, data, estimator, quantile: float = DEFAULT_LATENCY_QUANTILE, split: str = "train",
                       output_tokens: np.ndarray | None = None) -> LatencyGuardrail:
        """A guardrail whose per-family predicted fractions come from a latency estimator
        (`flexvlm_env.latency.StageLatencyEstimator`) instead of recorded latencies: for each
        family and config, the `quantile` over the family's `split` requests of the estimator's
        latency (`flexvlm_env.latency.guardrail.predict_replay_latency`: the request's own input
        tokens, a predicted output length) over the family's median predicted full-config latency.
        `data` is a `ReplayData` (its recorded latencies are not read; its output lengths only
        through the predicted lengths of the train half). Families without requests are NaN, which
        the constructor replaces by the slowest family's row."""
        from flexvlm_env.latency.guardrail import predict_replay_latency
        from flexvlm_env.profiles.replay import request_split_mask

        predicted_ms = predict_replay_latency(data, estimator, output_tokens)
        in_split = request_split_mask(data.request_ids, data.families, split)
        families = np.asarray(data.families)
        fraction = np.full((len(FAMILY_NAMES), predicted_ms.shape[1]), np.nan)
        for i, family in enumerate(FAMILY_NAMES):
            rows = (families == family) & in_split
            if not rows.any():
                continue
            full = float(np.median(predicted_ms[rows, data.full_index]))
            fraction[i] = np.quantile(predicted_ms[rows] / full, quantile, axis=0)
        return cls(fraction, quantile)


def optional_guardrail_state(guardrail: LatencyGuardrail | None) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(config or None, tensors) of a controller's optional guardrail, for its `state()`."""
    return guardrail.state() if guardrail is not None else (None, {})


def optional_guardrail_from_state(config: dict | None, tensors: Mapping[str, torch.Tensor]) -> LatencyGuardrail | None:
    """The guardrail `optional_guardrail_state` saved (None if there was none)."""
    return LatencyGuardrail.from_state(config, tensors) if config is not None else None
