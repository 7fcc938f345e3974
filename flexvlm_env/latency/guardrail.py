"""Budget guardrail from a latency estimator (issue 8, M4): candidate filtering by predicted latency.

`filter_by_budget` keeps the candidate configurations whose predicted latency, times a safety
`margin`, is within the budget. It never returns an empty set: when no candidate passes, the
single candidate with the lowest predicted latency is returned (the request must still be served,
and the fastest configuration is the one most likely to meet the budget). `budget_mask` is the
same test, vectorised over requests.

`predict_replay_latency` predicts every (request, config) latency of a replay pool with a
`StageLatencyEstimator` from the request's own token counts at each config's crop count. The
output length of a request is unknown when the configuration is chosen (it is what the model
will generate), so the prediction uses a *predicted* output length: by default the median output
length of the request's family at that config over the training half of the pool
(`predicted_output_tokens`); the true recorded lengths are never read for held-out requests.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .estimator import StageLatencyEstimator


def _positive(name: str, value: float) -> float:
    """`value` as a float, or a ValueError naming `name` unless it is a finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}={value!r} must be a number") from exc
    if not np.isfinite(number) or number <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return number


def filter_by_budget(candidates: Sequence, predicted_ms: Sequence[float], budget_ms: float, margin: float = 1.0) -> list:
    """The candidates with `predicted_ms × margin <= budget_ms`, in their input order.

    Args:
        candidates: the candidate configurations (any objects, e.g. config indices or `Config`s).
        predicted_ms: predicted latency of each candidate (same length, finite, >= 0).
        budget_ms: the request's latency budget (finite, > 0).
        margin: safety factor (> 0): above 1 is conservative (fewer false accepts, more false
            rejects), below 1 optimistic.

    Returns:
        The kept candidates. Never empty: when no candidate passes, `[the candidate with the lowest
        predicted latency]` (first such on ties).

    Raises:
        ValueError: no candidates, lengths that differ, non-finite or negative predictions,
            a budget that is not finite and > 0, a margin that is not finite and > 0.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("filter_by_budget needs at least one candidate")
    try:
        predicted = np.asarray(predicted_ms, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"predicted_ms must be numeric: {exc}") from exc
    if len(predicted) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(predicted)} predicted latencies")
    if not np.all(np.isfinite(predicted)) or np.any(predicted < 0):
        raise ValueError("predicted_ms must be finite and >= 0")
    budget = _positive("budget_ms", budget_ms)
    keep = budget_mask(predicted[None], np.array([budget]), _positive("margin", margin))[0]
    return [c for c, k in zip(candidates, keep) if k]


def budget_mask(predicted_ms: np.ndarray, budget_ms: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """bool [R, C]: `predicted_ms[r, c] × margin <= budget_ms[r]`; a row with no True gets its
    lowest-predicted column (the never-empty fallback of `filter_by_budget`)."""
    predicted = np.asarray(predicted_ms, dtype=np.float64)
    budget = np.asarray(budget_ms, dtype=np.float64).reshape(-1)
    if predicted.ndim != 2 or predicted.shape[1] == 0 or predicted.shape[0] != len(budget):
        raise ValueError(f"predicted_ms {predicted.shape} must be [R, C>=1] with R = len(budget_ms) = {len(budget)}")
    if not np.all(np.isfinite(predicted)) or np.any(predicted < 0):
        raise ValueError("predicted_ms must be finite and >= 0")
    if not np.all(np.isfinite(budget)) or np.any(budget <= 0):
        raise ValueError("budget_ms must be finite and > 0")
    margin = _positive("margin", margin)
    allowed = predicted * margin <= budget[:, None]
    empty = np.flatnonzero(~allowed.any(axis=1))
    allowed[empty, np.argmin(predicted[empty], axis=1)] = True
    return allowed


def predicted_output_tokens(data, split: str = "train") -> np.ndarray:
    """float [R, C]: each request's predicted output length at each config: the median recorded
    output length of its family at that config over the `split` half of the pool (not the
    request's own, which is unknown at decision time for a held-out request)."""
    from ..profiles.replay import request_split_mask

    families = np.asarray(data.families)
    source = request_split_mask(data.request_ids, data.families, split)
    out = np.zeros(data.output_tokens.shape, np.float64)
    for family in sorted(set(data.families)):
        rows = families == family
        ref = rows & source if (rows & source).any() else rows
        out[rows] = np.median(data.output_tokens[ref], axis=0)[None]
    return out


def request_input_tokens(data, preset: str = "molmoe-1b") -> np.ndarray:
    """float [R, len(grid.crops)]: each request's input tokens (vision + layout + prompt) for
    `preset` at each crop count of the grid, from the shipped request table."""
    from ..profiles.loading import REQUESTS_TABLE, profiles_dir
    from ..profiles.tables import read_parquet

    requests, _ = read_parquet(profiles_dir() / REQUESTS_TABLE)
    column = f"{preset}/input_tokens"
    if column not in requests:
        raise ValueError(f"the request table has no {column!r} column")
    table = requests.pivot(index="request_id", columns="crops", values=column)
    missing = set(data.request_ids) - set(table.index)
    if missing:
        raise ValueError(f"the request table lacks {len(missing)} requests, e.g. {sorted(missing)[:2]}")
    return table.loc[list(data.request_ids), list(data.grid.crops)].to_numpy(np.float64)


def predict_replay_latency(data, estimator: StageLatencyEstimator, output_tokens: np.ndarray | None = None,
                           preset: str | None = None) -> np.ndarray:
    """float [R, C]: the estimator's latency (ms) of every (request, config) of `data` (a
    `ReplayData`), from the request's own input tokens at each config's crop count and
    `output_tokens` ([R, C]; default `predicted_output_tokens(data)`, see the module docstring).
    `preset` (default: the estimator's metadata preset, else molmoe-1b) picks the token columns."""
    preset = preset or estimator.metadata.get("preset", "molmoe-1b")
    inputs = request_input_tokens(data, preset)
    out = predicted_output_tokens(data) if output_tokens is None else np.asarray(output_tokens, np.float64)
    if out.shape != data.total_ms.shape:
        raise ValueError(f"output_tokens has shape {out.shape}, expected {data.total_ms.shape}")
    crops_col = {c: i for i, c in enumerate(data.grid.crops)}
    predicted = np.zeros(data.total_ms.shape, np.float64)
    for j, config in enumerate(data.grid.configs()):
        predicted[:, j] = estimator.predict_total(config.crops, inputs[:, crops_col[config.crops]], config.top_k,
                                                  config.active_blocks, out[:, j])
    return predicted
