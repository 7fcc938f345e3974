"""Latency estimation from the recorded profiles (issue 8, E3): a stage-aware parametric estimator,
total-only baselines, and recalibration to another device from a few measurements."""
from .baselines import LogLinearTotal, MLPTotal
from .estimator import FEATURES, INPUTS, STAGES, StageLatencyEstimator, workload
from .recalibrate import METHODS, Recalibrated, recalibrate

__all__ = ["FEATURES", "INPUTS", "METHODS", "STAGES", "LogLinearTotal", "MLPTotal", "Recalibrated",
           "StageLatencyEstimator", "recalibrate", "workload"]
