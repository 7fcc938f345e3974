"""Move a fitted `StageLatencyEstimator` to another device from a few target measurements.

Methods (each takes a source estimator and a calibration table measured on the target, with
per-stage columns `<prefix><stage>_ms` and the total `<prefix>total_ms`):

- `global_affine`: total ≈ a·pred_total + b (relative-error least squares);
- `per_stage_affine`: each stage ≈ a_s·pred_s + b_s, total = Σ + the source overhead re-estimated;
- `fine_tune`: refit every stage's physics coefficients on the calibration rows with a ridge prior
  towards the source coefficients scaled per stage by the calibration's target/source ratio
  (relative to their magnitude; `ridge` = weight of the prior in units of one calibration row's
  squared relative error).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .estimator import STAGES, StageLatencyEstimator

METHODS = ("source_only", "global_affine", "per_stage_affine", "fine_tune")


def _affine(pred: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising Σ((a·pred + b - y) / y)², with a >= 0 (falls back to a ratio)."""
    w = 1.0 / np.maximum(np.abs(measured), 1e-6)
    x = np.stack([pred * w, w], axis=1)
    (a, b), *_ = np.linalg.lstsq(x, measured * w, rcond=None)
    if a <= 0 or not np.isfinite(a):
        a, b = float(np.median(measured / np.maximum(pred, 1e-9))), 0.0
    return float(a), float(b)


@dataclass
class Recalibrated:
    """A source estimator with per-stage (a_s, b_s) and a global (a, b) map on top."""

    source: StageLatencyEstimator
    stage_affine: dict[str, tuple[float, float]] | None = None
    total_affine: tuple[float, float] | None = None
    overhead_ms: float | None = None

    @property
    def metadata(self) -> dict:
        return self.source.metadata

    def _mapped(self, stages: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The source's per-stage predictions (`<stage>` keys) through the maps, and the total."""
        if self.stage_affine is not None:
            stages = {s: self.stage_affine[s][0] * stages[s] + self.stage_affine[s][1] for s in STAGES}
            overhead = self.source.overhead_ms if self.overhead_ms is None else self.overhead_ms
        else:
            overhead = self.source.overhead_ms
        total = sum(stages[s] for s in STAGES) + overhead
        if self.total_affine is not None:
            total = self.total_affine[0] * total + self.total_affine[1]
        return stages, total

    def predict_total(self, crops, input_tokens, top_k, active_blocks, output_tokens) -> np.ndarray:
        """Milliseconds (inputs broadcast), as `StageLatencyEstimator.predict_total`: a recalibrated
        estimator serves wherever the source does (guardrails, `predict_replay_latency`)."""
        return self._mapped(self.source.predict_stages(crops, input_tokens, top_k, active_blocks, output_tokens))[1]

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        source = self.source.predict_frame(frame)
        stages, total = self._mapped({s: source[f"{s}_ms"] for s in STAGES})
        return pd.DataFrame({**{f"{s}_ms": stages[s] for s in STAGES}, "total_ms": total}, index=frame.index)


def recalibrate(source: StageLatencyEstimator, calibration: pd.DataFrame, method: str, *, prefix: str = "",
                ridge: float = 1.0, prefill_bucket: int | None = None):
    """A predictor (with `predict_frame`) for the target device; see module docstring.
    `prefill_bucket`: the target runtime's prefill padding (fine-tune only; default: the source's)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    if method == "source_only":
        return source
    if len(calibration) < 2:
        raise ValueError(f"recalibration needs at least 2 target measurements, got {len(calibration)}")
    total_col = f"{prefix}total_ms"
    if method == "global_affine":
        pred = source.predict_frame(calibration)["total_ms"].to_numpy()
        return Recalibrated(source, total_affine=_affine(pred, calibration[total_col].to_numpy(np.float64)))
    if method == "per_stage_affine":
        pred = source.predict_frame(calibration)
        maps = {}
        for s in STAGES:
            y = calibration[f"{prefix}{s}_ms"].to_numpy(np.float64)
            keep = y > 0
            maps[s] = _affine(pred[f"{s}_ms"].to_numpy()[keep], y[keep]) if keep.sum() >= 2 else (1.0, 0.0)
        stage_sum = sum(calibration[f"{prefix}{s}_ms"].to_numpy(np.float64) for s in STAGES)
        overhead = float(np.median(calibration[total_col].to_numpy(np.float64) - stage_sum))
        return Recalibrated(source, stage_affine=maps, overhead_ms=overhead)
    # Prior: the source coefficients scaled per stage by the target/source ratio (a device that is
    # uniformly faster moves every coefficient of a stage together), then refit with the ridge.
    pred = source.predict_frame(calibration)
    scaled = {}
    for s in STAGES:
        y, p = calibration[f"{prefix}{s}_ms"].to_numpy(np.float64), pred[f"{s}_ms"].to_numpy()
        keep = (y > 0) & (p > 0)
        ratio = float(np.sum(p[keep] / y[keep]) / np.sum((p[keep] / y[keep]) ** 2)) if keep.any() else 1.0
        scaled[s] = source.coefficients[s] * (ratio if np.isfinite(ratio) and ratio > 0 else 1.0)
    prior = StageLatencyEstimator(scaled, source.overhead_ms, source.metadata, source.prefill_bucket)
    return StageLatencyEstimator.fit(calibration, prefix=prefix, prior=prior, ridge=ridge, prefill_bucket=prefill_bucket,
                                     metadata={**source.metadata, "fine_tuned_rows": len(calibration)})
