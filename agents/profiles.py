"""What the training-free and supervised controllers (and the baselines) know: recorded profiles.

`ProfileTables` is the train half of a recorded pool (`request_split_mask`), as dense arrays:
quality and median latency of every request at every configuration, the recorded latency
residuals, and each request's budget reference (its family's full-configuration latency over the
whole pool, which is what the env multiplies budget fractions by). From it come the latency each
family needs at each configuration (a quantile over its requests and the recorded residuals: the
guardrail's and the baselines' prediction, as a fraction of the budget reference) and the oracle labels (per request and budget, the
configurations with the best quality that meet the budget).

Reading the tables is profiling: `n_profiled` counts the (request, configuration) executions they
hold, which is these methods' sample cost in E5.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import FAMILY_NAMES
from flexvlm_env.envs.replay import ReplayTables
from flexvlm_env.profiles.replay import ReplayData

DEFAULT_LATENCY_QUANTILE = 0.95


@dataclass(frozen=True, eq=False)
class ProfileTables:
    grid: KnobGrid
    request_ids: tuple[str, ...]
    family_index: np.ndarray  # int64 [R], position in FAMILY_NAMES
    quality: np.ndarray  # float64 [R, C]
    latency_ms: np.ndarray  # float64 [R, C], median over repeats
    noise_factor: np.ndarray  # float64 [C, M], repeat / median
    reference_ms: np.ndarray  # float64 [R], the family's full-config latency (budget = fraction x this)
    prompt_features: np.ndarray  # float32 [R, 4], as the env observes them
    image_features: np.ndarray  # float32 [R, 6]
    metadata: dict

    @classmethod
    def from_replay(cls, data: ReplayData, split: str = "train") -> ProfileTables:
        # The replay env's own lookup tables for that split: the same requests, family indices,
        # budget references and float64 latencies that the env steps with.
        tables = ReplayTables(data, FAMILY_NAMES, split)
        return cls(
            grid=data.grid,
            request_ids=tables.request_ids,
            family_index=tables.family_index,
            quality=tables.quality,
            latency_ms=tables.total_ms,
            noise_factor=tables.noise_factor,
            reference_ms=tables.full_latency_ms,
            prompt_features=tables.prompt,
            image_features=tables.image,
            metadata={**data.metadata, "split": split},
        )

    @classmethod
    def load(cls, quality: str = "micro", latency: str = "molmoe-1b-h100", split: str = "train",
             requests: str | None = None) -> ProfileTables:
        """The `split` half of the tables `flexvlm_env.profiles.load_replay_data` loads (shipped names or paths)."""
        from flexvlm_env.profiles import load_replay_data

        return cls.from_replay(load_replay_data(quality=quality, latency=latency, requests=requests), split)

    @property
    def n_requests(self) -> int:
        return len(self.request_ids)

    @property
    def n_profiled(self) -> int:
        """(request, configuration) executions behind these tables (the profiling cost)."""
        return int(self.quality.size)

    def subset(self, rows: np.ndarray) -> ProfileTables:
        """The tables of requests `rows` only (e.g. the first n of a seeded profiling order)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ProfileTables(
            grid=self.grid, request_ids=tuple(self.request_ids[i] for i in rows), family_index=self.family_index[rows],
            quality=self.quality[rows], latency_ms=self.latency_ms[rows], noise_factor=self.noise_factor,
            reference_ms=self.reference_ms[rows], prompt_features=self.prompt_features[rows],
            image_features=self.image_features[rows], metadata=self.metadata,
        )

    def retimed(self, factor: np.ndarray, residual: np.ndarray | None = None) -> ProfileTables:
        """These tables as a serving host sees them (`flexvlm_env.latency.retime`): every latency of
        a request of family f at configuration c times `factor[f, c]` (or `factor[c]`), so that over
        the unchanged budget references they are the host's fractions, and, if given, the host's
        `residual` [C, M] in place of the recorded residuals. Quality is unchanged."""
        from flexvlm_env.latency.retime import check_factors, check_residuals

        factor = check_factors(factor, len(FAMILY_NAMES), len(self.grid))
        noise = self.noise_factor if residual is None else check_residuals(residual, len(self.grid))
        return replace(self, latency_ms=self.latency_ms * factor[self.family_index], noise_factor=noise,
                       metadata={**self.metadata, "retimed": True})

    def observations(self, budget_fraction: float) -> dict[str, np.ndarray]:
        """The batch of observations the env shows for every request at `budget_fraction`."""
        n = self.n_requests
        budget_ms = (budget_fraction * self.reference_ms).astype(np.float32)
        return {
            "family": self.family_index.copy(),
            "budget_ms": budget_ms.reshape(n, 1),
            "budget_fraction": np.full((n, 1), budget_fraction, dtype=np.float32),
            "prompt": self.prompt_features.copy(),
            "image": self.image_features.copy(),
        }

    def family_latency_fraction(self, quantile: float = DEFAULT_LATENCY_QUANTILE) -> np.ndarray:
        """float64 [F, C]: the `quantile` of latency / budget reference over a family's requests and
        the recorded residuals (NaN for families without requests): a budget fraction >= this value
        is met by that share of the family's requests."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile={quantile!r} must be in (0, 1]")
        out = np.full((len(FAMILY_NAMES), len(self.grid)), np.nan)
        for f in np.unique(self.family_index):
            rows = self.family_index == f
            relative = self.latency_ms[rows] / self.reference_ms[rows, None]
            samples = relative[:, :, None] * self.noise_factor[None]
            out[f] = np.quantile(samples.transpose(1, 0, 2).reshape(len(self.grid), -1), quantile, axis=1)
        return out

    def family_quality(self) -> np.ndarray:
        """float64 [F, C]: mean quality of a family's requests at each configuration."""
        out = np.full((len(FAMILY_NAMES), len(self.grid)), np.nan)
        for f in np.unique(self.family_index):
            out[f] = self.quality[self.family_index == f].mean(axis=0)
        return out

    def meets_budget(self, budget_ms: np.ndarray, quantile: float = DEFAULT_LATENCY_QUANTILE) -> np.ndarray:
        """bool [R, C]: configurations whose latency for each request, at the `quantile` of the
        recorded residuals, is within `budget_ms` [R]."""
        factor = np.quantile(self.noise_factor, quantile, axis=1)
        return self.latency_ms * factor[None] <= np.asarray(budget_ms, dtype=np.float64)[:, None]

    def oracle_targets(self, budget_ms: np.ndarray, quantile: float = DEFAULT_LATENCY_QUANTILE) -> np.ndarray:
        """float32 [R, C] target distributions: uniform over the configurations with the request's
        best quality among those meeting its budget; the fastest configuration when none does.

        Several configurations often tie (a right answer is right at many of them); keeping all
        of them as the target, rather than one arbitrary tie-break, is what makes the labels
        learnable from request features."""
        meets = self.meets_budget(budget_ms, quantile)
        quality = np.where(meets, self.quality, -np.inf)
        best = quality.max(axis=1, keepdims=True)
        targets = (quality == best) & meets
        none = ~meets.any(axis=1)
        targets[none] = False
        targets[none, np.argmin(self.latency_ms[none], axis=1)] = True
        return (targets / targets.sum(axis=1, keepdims=True)).astype(np.float32)
