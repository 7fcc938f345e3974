"""Latency composed from stage tables: what a request would take, from its token counts.

A stage table (`profile_stages`) holds measured stage times at every (crops, prefill-length
bucket, top_k, active_blocks). The runtime's cost structure makes the composition simple:

- the vision encoder and the projector depend on the crop count only (one CUDA graph per crop
  count); host preprocessing too, plus the prompt's tokenization (a fitted cost per input token);
- prefill runs one graph per (top_k, plan, input length rounded up to the 64-token bucket), so its
  time is a function of (top_k, active_blocks, bucket); a bucket not measured is interpolated
  linearly between the nearest measured ones of the same (top_k, active_blocks);
- a decode step reads the weights and the visible part of the KV cache, so its time is affine in the
  position: fitted per (top_k, active_blocks) by least squares over every recorded decode step.

total = preprocess + vision + projector + prefill(bucket(input)) + sum over the output tokens after
the first of decode(position). The recorded repeats give the noise residuals log(repeat / median)
per configuration. `validate` compares the composition with end-to-end measurements of requests
the stage table never saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import KnobGrid

PREFILL_BUCKET = 64


@dataclass
class StageModel:
    per_crops_ms: dict[int, np.ndarray]  # crops -> [preprocess, vision_encoder, projector] medians
    prefill_ms: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]  # (top_k, blocks) -> (buckets, ms)
    decode_fit: dict[tuple[int, int], tuple[float, float]]  # (top_k, blocks) -> (ms at position 0, ms per position)
    noise_log_ratio: dict[tuple[int, int, int], np.ndarray]  # (crops, top_k, blocks) -> residuals
    metadata: dict
    preprocess_ms_per_input_token: float = 0.0
    preprocess_reference_tokens: dict[int, float] | None = None  # crops -> input length of the median

    @classmethod
    def fit(cls, stages: pd.DataFrame) -> "StageModel":
        if stages.empty:
            raise ValueError("the stage table is empty")
        per_crops = {
            int(c): g[["preprocess_ms", "vision_encoder_ms", "projector_ms"]].median().to_numpy(np.float64)
            for c, g in stages.groupby("crops")
        }
        # Host preprocessing also tokenizes the prompt: one slope per input token, shared by all
        # crop counts (within a crop count only the prompt changes the input length).
        centered = stages.groupby("crops")["measured_input_tokens"].transform(lambda n: n - n.median())
        residual = stages["preprocess_ms"] - stages.groupby("crops")["preprocess_ms"].transform("median")
        slope = float(np.polyfit(centered, residual, 1)[0]) if centered.abs().sum() > 0 else 0.0
        preprocess_ref = {int(c): float(g["measured_input_tokens"].median()) for c, g in stages.groupby("crops")}
        stages = stages.assign(bucket=(np.ceil(stages["measured_input_tokens"] / PREFILL_BUCKET) * PREFILL_BUCKET).astype(int))
        prefill, decode = {}, {}
        for (k, b), g in stages.groupby(["top_k", "active_blocks"]):
            med = g.groupby("bucket")["prefill_ms"].median().sort_index()
            prefill[(int(k), int(b))] = (med.index.to_numpy(np.float64), med.to_numpy(np.float64))
            positions, times = [], []
            for start, per_token in zip(g["measured_input_tokens"], g["decode_ms_per_token"]):
                per_token = np.asarray(per_token, dtype=np.float64)
                positions.append(start + np.arange(len(per_token)))
                times.append(per_token)
            x, y = np.concatenate(positions), np.concatenate(times)
            per_position, intercept = np.polyfit(x, y, 1) if len(np.unique(x)) > 1 else (0.0, float(np.median(y)))
            decode[(int(k), int(b))] = (float(intercept), float(per_position))
        noise = {}
        for (c, k, b), g in stages.groupby(["crops", "top_k", "active_blocks"]):
            ratios = g.groupby("input_tokens")["total_ms"].transform(lambda t: np.log(t / t.median()))
            noise[(int(c), int(k), int(b))] = ratios.to_numpy(np.float64)
        return cls(per_crops, prefill, decode, noise, dict(stages.attrs.get("metadata", {})), slope, preprocess_ref)

    def prefill(self, top_k: int, blocks: int, input_tokens: np.ndarray) -> np.ndarray:
        buckets, ms = self.prefill_ms[(top_k, blocks)]
        wanted = np.ceil(np.asarray(input_tokens) / PREFILL_BUCKET) * PREFILL_BUCKET
        if len(buckets) == 1:
            return np.full(wanted.shape, ms[0])
        # np.interp holds the end values outside the range; extend with the end slopes instead. Below the
        # table a steep first segment would reach negative times for short inputs: clipped at zero, as
        # preprocessing is (a table profiled over the lengths it serves never extrapolates far).
        inside = np.interp(wanted, buckets, ms)
        low_slope = (ms[1] - ms[0]) / (buckets[1] - buckets[0])
        high_slope = (ms[-1] - ms[-2]) / (buckets[-1] - buckets[-2])
        below = np.maximum(ms[0] + (wanted - buckets[0]) * low_slope, 0.0)
        inside = np.where(wanted < buckets[0], below, inside)
        return np.where(wanted > buckets[-1], ms[-1] + (wanted - buckets[-1]) * high_slope, inside)

    def decode_total(self, top_k: int, blocks: int, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        """Sum of decode(position) over positions input .. input + output - 2 (the first token
        comes from prefill)."""
        intercept, slope = self.decode_fit[(top_k, blocks)]
        steps = np.maximum(np.asarray(output_tokens, dtype=np.float64) - 1, 0)
        first = np.asarray(input_tokens, dtype=np.float64)
        mean_position = first + (steps - 1) / 2
        return steps * (intercept + slope * mean_position)

    def compose(self, crops: int, top_k: int, blocks: int, input_tokens, output_tokens) -> np.ndarray:
        """Stage times [n, 5] (preprocess, vision_encoder, projector, prefill, decode) in ms."""
        for name, value, known in (("crops", crops, self.per_crops_ms), ("(top_k, active_blocks)", (top_k, blocks), self.decode_fit)):
            if value not in known:
                raise ValueError(f"{name}={value!r} is not in the stage table; measured: {sorted(known)}")
        input_tokens = np.atleast_1d(np.asarray(input_tokens))
        out = np.empty((len(input_tokens), 5))
        out[:, :3] = self.per_crops_ms[crops]
        if self.preprocess_reference_tokens:
            shift = input_tokens - self.preprocess_reference_tokens[crops]
            out[:, 0] = np.maximum(out[:, 0] + self.preprocess_ms_per_input_token * shift, 0.0)
        out[:, 3] = self.prefill(top_k, blocks, input_tokens)
        out[:, 4] = self.decode_total(top_k, blocks, input_tokens, np.atleast_1d(output_tokens))
        return out

    def noise_matrix(self, grid: KnobGrid, width: int | None = None) -> np.ndarray:
        """Residuals [len(grid), M] in grid order (see `residual_matrix`)."""
        pools = [self.noise_log_ratio.get((c.crops, c.top_k, c.active_blocks), np.zeros(0)) for c in grid.configs()]
        return residual_matrix(pools, width)


def residual_matrix(pools, width: int | None = None) -> np.ndarray:
    """One row per configuration from its pool of log(repeat / median) residuals, each pool tiled
    to the longest one's width (a uniform draw from a row is a uniform draw from its pool); a
    configuration without repeats gets zeros (no noise)."""
    width = width or max(1, max(len(p) for p in pools))
    return np.stack([np.resize(p, width) if len(p) else np.zeros(width) for p in pools]).astype(np.float32)


def error_summary(measured_ms, composed_ms) -> dict:
    """Median and P95 of |composed - measured| / measured, in percent."""
    measured, composed = np.asarray(measured_ms, float), np.asarray(composed_ms, float)
    err = np.abs(composed - measured) / measured * 100
    return {
        "n_requests": int(len(err)),
        "median_abs_pct_error": float(np.median(err)),
        "p95_abs_pct_error": float(np.percentile(err, 95)),
        "max_abs_pct_error": float(err.max()),
        "median_signed_pct_error": float(np.median((composed - measured) / measured * 100)),
    }

