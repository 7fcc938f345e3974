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

from bisect import bisect_right
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
        self.predicted_fraction.setflags(write=False)  # fixed: `_prefix_mask` caches what it implies
        self.quantile = quantile
        self._fastest = np.argmin(self.predicted_fraction, axis=1)
        self._sorted_fractions: list[list[float]] | None = None  # per family, ascending (`_prefix_mask`)
        self._prefix_masks: np.ndarray | None = None  # float32 [F, C + 1, C]: 0 allowed, -inf not

    @classmethod
    def from_profiles(cls, profiles: ProfileTables, quantile: float = DEFAULT_LATENCY_QUANTILE) -> LatencyGuardrail:
        return cls(profiles.family_latency_fraction(quantile), quantile)

    def rescaled(self, factor: np.ndarray) -> LatencyGuardrail:
        """This guardrail with its predicted fractions times `factor` ([F, C] per family and
        configuration, or [C]; a serving host's `flexvlm_env.latency.retime.host_factors`): what
        `from_profiles` gives on the profiles with their latencies scaled the same way, since a
        quantile scales with its samples."""
        from flexvlm_env.latency.retime import check_factors

        return LatencyGuardrail(self.predicted_fraction * check_factors(factor, *self.predicted_fraction.shape), self.quantile)

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
        return self._prefix_mask(index, budget_fraction) == 0

    def argmax_allowed(self, index: int, budget_fraction: float, logits: np.ndarray) -> int:
        """The configuration with the largest of `logits` [C] among those `mask(index, budget_fraction)` allows
        (the first on ties, as `np.where(mask, logits, -inf).argmax()`): a masked policy's batch-1 decision, an
        add and an argmax on the request's prefix mask (M3's decision time)."""
        prefix = self._prefix_mask(index, budget_fraction)
        best = int((logits + prefix).argmax())
        if prefix[best] != 0:  # a NaN logit where the mask is -inf: decide as np.where(mask, ...) does
            return int(np.where(prefix == 0, logits, -np.inf).argmax())
        return best

    def _prefix_mask(self, index: int, budget_fraction: float) -> np.ndarray:
        """float32 [C], 0 where allowed and -inf elsewhere: one request's mask. A family's allowed configurations
        are those with the smallest predicted fractions, so its masks are C + 1 prefixes of its configurations
        sorted by predicted fraction, built once; a bisection of the sorted fractions picks one (no fit, or a
        NaN budget, which nothing fits: the prefix of none, holding the fastest configuration)."""
        if self._prefix_masks is None:
            self._build_prefix_masks()
        threshold = float(budget_fraction) + _BUDGET_TOLERANCE
        count = bisect_right(self._sorted_fractions[index], threshold) if threshold == threshold else 0
        return self._prefix_masks[index, count]

    def _build_prefix_masks(self) -> None:
        families, configs = self.predicted_fraction.shape
        order = np.argsort(self.predicted_fraction, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(configs)[None].repeat(families, 0), axis=1)
        # row n of family f: its n configurations of smallest predicted fraction allowed
        masks = np.where(rank[:, None, :] < np.arange(configs + 1)[None, :, None], 0.0, -np.inf).astype(np.float32)
        masks[np.arange(families), 0, self._fastest] = 0.0  # none fits: the fastest, as `masks` falls back
        self._sorted_fractions = np.take_along_axis(self.predicted_fraction, order, axis=1).tolist()
        self._prefix_masks = masks

    def mask_fn(self, env: gym.Env) -> np.ndarray:
        """`DiscreteKnobs`'s mask_fn: the mask for the request the env's next action answers."""
        request: Mapping[str, Any] = env.unwrapped.current_request
        return self.mask(request["family"], request["budget_fraction"])

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"quantile": self.quantile}, {"guardrail.predicted_fraction": torch.from_numpy(self.predicted_fraction.copy())}

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
