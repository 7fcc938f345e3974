"""Total-only latency models to compare the stage estimator with.

- `LogLinearTotal`: log(total) linear in (log crops, log input tokens, log top_k, log blocks,
  log(1 + output), output): one regression of the total, no stage structure. JSON.
- `MLPTotal`: a tiny MLP (5 -> 32 -> 32 -> 1, SiLU) on standardised inputs predicting log(total),
  full-batch Adam; outputs clamped to the training range of log(total) ± log 2. Weights in safetensors, normalisation in a JSON sidecar; no pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .estimator import INPUTS, frame_workload, workload

LOGLINEAR_FORMAT = "flexvlm-loglinear-total/1"
MLP_FORMAT = "flexvlm-mlp-total/1"


def _loglinear_features(w: dict[str, np.ndarray]) -> np.ndarray:
    c, n, k, b, m = (w[name] for name in INPUTS)
    return np.stack([np.ones_like(c), np.log(c), np.log(n), np.log(k), np.log(b), np.log1p(m), m / 10], axis=1)


@dataclass
class LogLinearTotal:
    coefficients: np.ndarray
    metadata: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, frame: pd.DataFrame, total_column: str = "total_ms") -> LogLinearTotal:
        if len(frame) == 0:
            raise ValueError("cannot fit on an empty table")
        x = _loglinear_features(frame_workload(frame))
        y = np.log(frame[total_column].to_numpy(np.float64))
        return cls(np.linalg.lstsq(x, y, rcond=None)[0])

    def predict_total(self, crops, input_tokens, top_k, active_blocks, output_tokens) -> np.ndarray:
        return np.exp(_loglinear_features(workload(crops, input_tokens, top_k, active_blocks, output_tokens)) @ self.coefficients)

    def predict_frame(self, frame: pd.DataFrame) -> np.ndarray:
        return np.exp(_loglinear_features(frame_workload(frame)) @ self.coefficients)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"format": LOGLINEAR_FORMAT, "coefficients": self.coefficients.tolist(), "metadata": self.metadata}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LogLinearTotal:
        data = json.loads(Path(path).read_text())
        if data.get("format") != LOGLINEAR_FORMAT:
            raise ValueError(f"{path} is not a {LOGLINEAR_FORMAT} model")
        return cls(np.asarray(data["coefficients"], np.float64), data.get("metadata", {}))


def _raw_inputs(w: dict[str, np.ndarray]) -> np.ndarray:
    c, n, k, b, m = (w[name] for name in INPUTS)
    return np.stack([c, n, k, b, m], axis=1)


class MLPTotal:
    """Tiny MLP on the five inputs predicting log(total_ms)."""

    def __init__(self, hidden: int = 32, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.hidden = hidden
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1)
        ).double()
        self.mean = np.zeros(5)
        self.std = np.ones(5)
        self.y_mean = 0.0
        self.y_range = (-np.inf, np.inf)

    def fit(self, frame: pd.DataFrame, total_column: str = "total_ms", steps: int = 1500, lr: float = 1e-2) -> MLPTotal:
        import torch

        if len(frame) == 0:
            raise ValueError("cannot fit on an empty table")
        x = _raw_inputs(frame_workload(frame))
        y = np.log(frame[total_column].to_numpy(np.float64))
        self.mean, self.std = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
        self.y_mean = float(y.mean())
        # predictions are clamped to the training range of log(total) ± log 2 (no wild extrapolation)
        self.y_range = (float(y.min() - np.log(2)), float(y.max() + np.log(2)))
        xt = torch.from_numpy((x - self.mean) / self.std)
        yt = torch.from_numpy(y - self.y_mean)[:, None]
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(self.net(xt), yt)
            loss.backward()
            opt.step()
            sched.step()
        return self

    def _predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.net(torch.from_numpy((x - self.mean) / self.std)).numpy()[:, 0]
        return np.exp(np.clip(out + self.y_mean, *self.y_range))

    def predict_total(self, crops, input_tokens, top_k, active_blocks, output_tokens) -> np.ndarray:
        return self._predict(_raw_inputs(workload(crops, input_tokens, top_k, active_blocks, output_tokens)))

    def predict_frame(self, frame: pd.DataFrame) -> np.ndarray:
        return self._predict(_raw_inputs(frame_workload(frame)))

    def save(self, path: str | Path) -> Path:
        """`path` (.safetensors) plus `path` with suffix .json for the normalisation."""
        from safetensors.torch import save_file

        path = Path(path)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path))
        path.with_suffix(".json").write_text(json.dumps({
            "format": MLP_FORMAT, "hidden": self.hidden, "mean": self.mean.tolist(), "std": self.std.tolist(), "y_mean": self.y_mean,
            "y_range": list(self.y_range),
        }))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MLPTotal:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format") != MLP_FORMAT:
            raise ValueError(f"{path} is not a {MLP_FORMAT} model")
        model = cls(hidden=int(meta["hidden"]))
        model.net.load_state_dict(load_file(str(path)))
        model.mean, model.std, model.y_mean = np.asarray(meta["mean"]), np.asarray(meta["std"]), float(meta["y_mean"])
        model.y_range = tuple(float(v) for v in meta["y_range"])
        return model
