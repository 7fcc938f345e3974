"""Stage-aware parametric latency estimator: per-stage physics with least-squares coefficients.

Inputs of one request: `crops` (the vision tokens follow from it for a preset), `input_tokens`
(vision + layout + prompt tokens the LLM prefills), `top_k`, `active_blocks`, `output_tokens`.
Each stage is linear in its coefficients, with features shaped by what the runtime does:

- preprocess (host: resize, patches, tokenization)  ≈ p0 + p1·crops + p2·n
- vision_encoder (one graph per crop count)         ≈ v0 + v1·crops
- projector                                          ≈ q0 + q1·crops
- prefill (graph per 64-token bucket N of n on CUDA; `prefill_bucket=1`: N = n, eager on a CPU)
         ≈ f0 + B·(a + b·N + c·N² + d(k)·N + e(k) + u·H(N, k)),
  d(k) = d1·k + d2·log2 k, e(k) = e1·k + e2·log2 k (expert GEMMs and routing; concave in k at small N),
  H(N, k) = 1 - (1 - k/E)^N: the expected fraction of the E = 64 experts that N tokens routed to k
  each touch. Prefill runs one grouped product per expert hit (CPU: a Python loop of small matmuls;
  CUDA: one padded tile per expert), so a fixed cost per expert hit saturates in N and k.
- decode, steps s = output - 1 (the first token comes from prefill), positions n .. n + s - 1:
  Σ_pos [g + B·(h + h_k·k + h_kv·pos)] + (w0 + B·w1 + B·k·w2)·W(s),  W(s) = Σ_{j<s} r^j
  The first steps after prefill are slower and the excess decays: each active block's weights
  come back into caches that prefill's activations filled (the CPU stage table's first step costs
  ~20% more than the steady state, fading over ~6 steps; fitted on the CPU requests table: ~0.05 ms
  per active block at the first step, r = 0.6). r is picked from WARMUP_RATIOS by the fit. A table whose
  answers all have one length (stage tables: 32 forced tokens) cannot tell W(s) from s, so its
  fit leaves the warm-up coefficients at 0 (or the prior's).
- total = Σ stages + overhead (host time outside the stage marks; the median residual).

Token counts enter in thousands (conditioning). Every coefficient but the stage intercepts is
constrained to be >= 0 (active-set least squares) and H and W grow with their arguments, so the
prediction never decreases when crops, tokens, top_k, active blocks or output tokens grow. Rows
are weighted by 1/measured stage time (relative error of each stage) or, with
`weighting="total"`, by 1/measured total (each stage's share of the total's relative error: for
end-to-end request tables, whose answers have their natural lengths). Saved as JSON (`save` /
`load`), no pickle; files written before the H and W terms load with those coefficients at 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

STAGES = ("preprocess", "vision_encoder", "projector", "prefill", "decode")
STAGE_COLUMNS = tuple(f"{s}_ms" for s in STAGES)
INPUTS = ("crops", "input_tokens", "top_k", "active_blocks", "output_tokens")
PREFILL_BUCKET = 64
N_EXPERTS = 64  # routed experts per MoE block of both presets (micro, molmoe-1b)
FORMAT = "flexvlm-stage-latency-estimator/1"

# feature names per stage; the ones named in FREE are unconstrained (intercepts)
FEATURES = {
    "preprocess": ("1", "crops", "n"),
    "vision_encoder": ("1", "crops"),
    "projector": ("1", "crops"),
    "prefill": ("1", "B", "B*N", "B*N^2", "B*k*N", "B*log2k*N", "B*k", "B*log2k", "B*experts_hit"),
    "decode": ("s", "s*B", "s*B*k", "B*sum_pos", "w", "w*B", "w*B*k"),
}
# decode's first steps after prefill run slower (see module docstring): w(s) = Σ_{j<s} r^j
WARMUP_RATIOS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
FREE = {"1"}


def _as_array(name: str, value, minimum: float) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {value!r}") from exc
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values")
    if np.any(arr < minimum):
        raise ValueError(f"{name} must be >= {minimum:g}; got min {arr.min():g}")
    return np.atleast_1d(arr)


def workload(crops, input_tokens, top_k, active_blocks, output_tokens) -> dict[str, np.ndarray]:
    """Validated, broadcast 1-D float arrays of the five inputs."""
    arrays = {
        "crops": _as_array("crops", crops, 1),
        "input_tokens": _as_array("input_tokens", input_tokens, 1),
        "top_k": _as_array("top_k", top_k, 1),
        "active_blocks": _as_array("active_blocks", active_blocks, 1),
        "output_tokens": _as_array("output_tokens", output_tokens, 0),
    }
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError as exc:
        raise ValueError(f"inputs of lengths {[a.size for a in arrays.values()]} do not broadcast") from exc
    return {k: np.broadcast_to(v, shape).astype(np.float64) for k, v in arrays.items()}


def decode_warmup(steps: np.ndarray, ratio: float) -> np.ndarray:
    """Σ_{j<steps} ratio^j: the decaying extra cost of the first decode steps in units of the
    first step's extra (0 without decode steps; nondecreasing in `steps` for 0 <= ratio < 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"decode_warmup_ratio={ratio!r} must be in [0, 1)")
    steps = np.asarray(steps, np.float64)
    return (1.0 - ratio**steps) / (1.0 - ratio) if ratio > 0 else (steps > 0).astype(np.float64)


def stage_features(stage: str, w: dict[str, np.ndarray], prefill_bucket: int = PREFILL_BUCKET,
                   decode_warmup_ratio: float = 0.0) -> np.ndarray:
    """Design matrix [n, len(FEATURES[stage])] of `stage` for workload `w`; prefill runs on the
    input length rounded up to `prefill_bucket` (64: CUDA graphs; 1: eager, e.g. on a CPU), decode's
    warm-up term decays with ratio `decode_warmup_ratio`."""
    c, n, k, b, m = (w[name] for name in INPUTS)
    one = np.ones_like(c)
    if stage == "preprocess":
        cols = [one, c, n / 1e3]
    elif stage in ("vision_encoder", "projector"):
        cols = [one, c]
    elif stage == "prefill":
        big_n = np.ceil(n / prefill_bucket) * prefill_bucket / 1e3
        lk = np.log2(k)
        hit = 1.0 - (1.0 - np.minimum(k, N_EXPERTS) / N_EXPERTS) ** (big_n * 1e3)
        cols = [one, b, b * big_n, b * big_n**2, b * k * big_n, b * lk * big_n, b * k, b * lk, b * hit]
    elif stage == "decode":
        s = np.maximum(m - 1, 0)
        sum_pos = (s * n + s * (s - 1) / 2) / 1e3
        warm = decode_warmup(s, decode_warmup_ratio)
        cols = [s, s * b, s * b * k, b * sum_pos, warm, warm * b, warm * b * k]
    else:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return np.stack(cols, axis=1)


def constrained_lstsq(x: np.ndarray, y: np.ndarray, free: np.ndarray, weights: np.ndarray | None = None,
                      prior: np.ndarray | None = None, ridge: float = 0.0, prior_scale: np.ndarray | None = None) -> np.ndarray:
    """argmin ||W(Xθ - y)||² + ridge·||(θ - prior)/prior_scale||² with θ_j >= 0 where not `free`.

    Active set: solve, clamp the most negative constrained coefficient to 0, repeat."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"design {x.shape} and target {y.shape} do not match")
    if len(y) == 0:
        raise ValueError("no rows to fit")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("non-finite values in the fit data")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    p = x.shape[1]
    prior = np.zeros(p) if prior is None else np.asarray(prior, float)
    scale = np.ones(p) if prior_scale is None else np.asarray(prior_scale, float)
    # column scaling for conditioning
    col = np.sqrt(np.mean((x * w[:, None]) ** 2, axis=0))
    col = np.where(col > 0, col, 1.0)
    xs, ys = x * w[:, None] / col, y * w
    active = np.ones(p, bool)
    theta = np.zeros(p)
    for _ in range(p + 1):
        idx = np.flatnonzero(active)
        a, t = xs[:, idx], ys
        if ridge > 0:
            # penalty on θ = u / col  ->  rows sqrt(ridge)·(u/col - prior)/scale
            pen = np.sqrt(ridge) / (scale[idx] * col[idx])
            a = np.vstack([a, np.diag(pen)])
            t = np.concatenate([t, np.sqrt(ridge) * prior[idx] / scale[idx]])
        u, *_ = np.linalg.lstsq(a, t, rcond=None)
        theta = np.zeros(p)
        theta[idx] = u / col[idx]
        bad = np.flatnonzero(active & ~free & (theta < 0))
        if len(bad) == 0:
            return theta
        active[bad[np.argmin(theta[bad])]] = False
    theta[~free] = np.maximum(theta[~free], 0)
    return theta


def frame_workload(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Workload of a table: stage tables name the measured length `measured_input_tokens`."""
    n = frame["measured_input_tokens"] if "measured_input_tokens" in frame else frame["input_tokens"]
    return workload(frame["crops"], n, frame["top_k"], frame["active_blocks"], frame["output_tokens"])


def _stage_targets(frame: pd.DataFrame, prefix: str = "") -> dict[str, np.ndarray]:
    missing = [f"{prefix}{c}" for c in STAGE_COLUMNS if f"{prefix}{c}" not in frame]
    if missing:
        raise ValueError(f"the table lacks the stage columns {missing}")
    return {s: frame[f"{prefix}{s}_ms"].to_numpy(np.float64) for s in STAGES}


def _fit_stage(x: np.ndarray, y: np.ndarray, free: np.ndarray, weights: np.ndarray, prior: np.ndarray | None,
               ridge: float, robust: bool) -> tuple[np.ndarray, float]:
    """Coefficients of one stage and their weighted squared residual (Huber-reweighted if `robust`)."""
    scale = None
    if prior is not None:
        scale = np.maximum(np.abs(prior), 1e-3 * max(np.abs(prior).max(), 1e-6))
    theta = constrained_lstsq(x, y, free, weights, prior, ridge if prior is not None else 0.0, scale)
    w = weights
    if robust:
        for _ in range(10):
            rel = np.abs(x @ theta - y) * weights
            w = weights * np.sqrt(np.minimum(1.0, 0.05 / np.maximum(rel, 1e-12)))
            theta = constrained_lstsq(x, y, free, w, prior, ridge if prior is not None else 0.0, scale)
    return theta, float(np.sum(((x @ theta - y) * w) ** 2))


# coefficients per stage of files written before the experts-hit and warm-up terms (appended last)
_V1_FEATURES = {"preprocess": 3, "vision_encoder": 2, "projector": 2, "prefill": 8, "decode": 4}


@dataclass
class StageLatencyEstimator:
    """Per-stage linear-in-coefficients latency model (see module docstring)."""

    coefficients: dict[str, np.ndarray]
    overhead_ms: float = 0.0
    metadata: dict = field(default_factory=dict)
    prefill_bucket: int = PREFILL_BUCKET
    decode_warmup_ratio: float = 0.0
    """r of the decode warm-up term w(s) = Σ_{j<s} r^j (0: only the first step is slower)"""

    def __post_init__(self) -> None:
        if not isinstance(self.prefill_bucket, (int, np.integer)) or self.prefill_bucket < 1:
            raise ValueError(f"prefill_bucket={self.prefill_bucket!r} must be a positive integer")
        self.prefill_bucket = int(self.prefill_bucket)
        ratio = float(self.decode_warmup_ratio)
        if not (np.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise ValueError(f"decode_warmup_ratio={self.decode_warmup_ratio!r} must be in [0, 1)")
        self.decode_warmup_ratio = ratio
        for stage in STAGES:
            if stage not in self.coefficients:
                raise ValueError(f"coefficients lack stage {stage!r}")
            coef = np.asarray(self.coefficients[stage], np.float64)
            if coef.shape == (_V1_FEATURES[stage],):
                coef = np.concatenate([coef, np.zeros(len(FEATURES[stage]) - _V1_FEATURES[stage])])  # files from before the new terms
            if coef.shape != (len(FEATURES[stage]),):
                raise ValueError(f"{stage}: {coef.shape[0] if coef.ndim else 0} coefficients, expected {len(FEATURES[stage])} {FEATURES[stage]}")
            if not np.all(np.isfinite(coef)):
                raise ValueError(f"{stage}: non-finite coefficients")
            self.coefficients[stage] = coef

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, frame: pd.DataFrame, *, prefix: str = "", metadata: dict | None = None,
            prior: StageLatencyEstimator | None = None, ridge: float = 0.0,
            prefill_bucket: int | None = None, robust: bool = False,
            decode_warmup_ratio: float | None = None, weighting: str = "stage") -> StageLatencyEstimator:
        """Fit every stage on `frame` (columns crops, input_tokens or measured_input_tokens, top_k,
        active_blocks, output_tokens, `<prefix><stage>_ms`, optionally `total_ms` or
        `<prefix>total_ms`). With `prior` and `ridge` > 0 the coefficients are pulled towards the
        prior's (fine-tuning from a few target measurements), relative to their magnitude.
        `robust`: Huber-reweighted fit (relative residuals beyond 5% down-weighted, 10 rounds), for
        tables with outliers such as runs on a shared, contended CPU.
        `decode_warmup_ratio`: r of the decode warm-up term; None picks the one of WARMUP_RATIOS
        with the smallest weighted residual on `frame` (the prior's with a prior).
        `weighting`: "stage" weights a stage's rows by 1/stage time (relative error of each stage),
        "total" by 1/total time (each stage's share of the total's relative error)."""
        if frame is None or len(frame) == 0:
            raise ValueError("cannot fit a latency estimator on an empty table")
        if weighting not in ("stage", "total"):
            raise ValueError(f"weighting={weighting!r}; allowed: 'stage', 'total'")
        if prefill_bucket is None:
            prefill_bucket = prior.prefill_bucket if prior is not None else PREFILL_BUCKET
        if decode_warmup_ratio is None and prior is not None:
            decode_warmup_ratio = prior.decode_warmup_ratio
        ratios = WARMUP_RATIOS if decode_warmup_ratio is None else (float(decode_warmup_ratio),)
        w = frame_workload(frame)
        targets = _stage_targets(frame, prefix)
        total_col = f"{prefix}total_ms" if f"{prefix}total_ms" in frame else ("total_ms" if "total_ms" in frame else None)
        if weighting == "total":
            total = frame[total_col].to_numpy(np.float64) if total_col else sum(targets.values())
        coefficients = {}
        ratio = ratios[0]
        for stage in STAGES:
            y = targets[stage]
            free = np.array([f in FREE for f in FEATURES[stage]])
            keep = y > 0 if stage == "decode" else np.ones(len(y), bool)  # one-token answers: no decode
            if stage == "decode" and not keep.any():
                coefficients[stage] = prior.coefficients[stage].copy() if prior else np.zeros(len(FEATURES[stage]))
                continue
            weights = 1.0 / np.maximum(np.abs(total[keep] if weighting == "total" else y[keep]), 1e-3)
            p0 = prior.coefficients[stage] if prior is not None and ridge > 0 else None
            # the warm-up term is told apart from the per-step cost only by answers of several lengths
            # (a stage table's forced output length makes it collinear with the `s` columns)
            warm_identifiable = stage == "decode" and len(np.unique(w["output_tokens"][keep])) >= 3
            best = None
            for r in (ratio,) if stage != "decode" else ratios if warm_identifiable or len(ratios) == 1 else (0.0,):
                x = stage_features(stage, w, prefill_bucket, r)[keep]
                if stage == "decode" and not warm_identifiable:
                    x[:, list(FEATURES["decode"]).index("w"):] = 0.0  # lstsq leaves these at 0 (or the prior)
                theta, loss = _fit_stage(x, y[keep], free, weights, p0, ridge, robust)
                if best is None or loss < best[2]:
                    best = (theta, r, loss)
            coefficients[stage] = best[0]
            if stage == "decode":
                ratio = best[1]
        est = cls(coefficients, 0.0, dict(metadata or {}), prefill_bucket, ratio)
        if total_col is not None:
            stage_sum = sum(targets[s] for s in STAGES)
            est.overhead_ms = float(np.median(frame[total_col].to_numpy(np.float64) - stage_sum))  # robust already
        elif prior is not None:
            est.overhead_ms = prior.overhead_ms
        return est

    # ---- prediction ----------------------------------------------------------------------
    def predict_stages(self, crops, input_tokens, top_k, active_blocks, output_tokens) -> dict[str, np.ndarray]:
        """Milliseconds per stage (1-D arrays; inputs broadcast)."""
        w = workload(crops, input_tokens, top_k, active_blocks, output_tokens)
        return {s: stage_features(s, w, self.prefill_bucket, self.decode_warmup_ratio) @ self.coefficients[s] for s in STAGES}

    def predict_total(self, crops, input_tokens, top_k, active_blocks, output_tokens) -> np.ndarray:
        stages = self.predict_stages(crops, input_tokens, top_k, active_blocks, output_tokens)
        return sum(stages.values()) + self.overhead_ms

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Predicted `<stage>_ms` and `total_ms` for each row of a table."""
        w = frame_workload(frame)
        out = {f"{s}_ms": stage_features(s, w, self.prefill_bucket, self.decode_warmup_ratio) @ self.coefficients[s] for s in STAGES}
        out["total_ms"] = sum(out.values()) + self.overhead_ms
        return pd.DataFrame(out, index=frame.index)

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "features": {s: list(FEATURES[s]) for s in STAGES},
            "coefficients": {s: [float(v) for v in self.coefficients[s]] for s in STAGES},
            "overhead_ms": float(self.overhead_ms),
            "prefill_bucket": self.prefill_bucket,
            "decode_warmup_ratio": self.decode_warmup_ratio,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict) -> StageLatencyEstimator:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a stage latency estimator (expected format {FORMAT!r})")
        current = {s: list(FEATURES[s]) for s in STAGES}
        older = {stage: names[:_V1_FEATURES[stage]] for stage, names in current.items()}
        if data.get("features") not in (current, older):
            raise ValueError("the saved estimator uses other features than this code")
        return cls({s: np.asarray(v, np.float64) for s, v in data["coefficients"].items()},
                   float(data.get("overhead_ms", 0.0)), dict(data.get("metadata", {})), int(data.get("prefill_bucket", PREFILL_BUCKET)),
                   float(data.get("decode_warmup_ratio", 0.0)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> StageLatencyEstimator:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no estimator at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from exc
        return cls.from_dict(data)
