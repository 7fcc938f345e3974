"""Serve a controller at a target violation rate on a host whose speed moves: an online budget margin.

Re-timing (`agents.retime`) corrects a controller's latency model for the serving host as of when
it ran. A host that then slows down (other tenants, clocks, a noisy neighbour on the PCIe bus) or
speeds up leaves the controller off again: in session 23's call 4 the host ran 1.29-1.37x the
re-timed prediction at P95 after its re-timing, and FlexVLM missed 25% of the 0.7 budgets.

`OnlineMarginController` wraps any controller and tells it a budget `scale` times the request's
(`budget_fraction` and `budget_ms` alike): a scale below 1 asks it for a margin, above 1 lets it
spend what a conservative latency model holds back. After each served request, `observe` updates
the scale by adaptive conformal inference (Gibbs & Candès, "Adaptive conformal inference under
distribution shift", NeurIPS 2021), on the log scale:

    log scale <- log scale - step * (violated - target_violation_rate)

A missed budget tightens the scale by `step * (1 - target)`, a met one loosens it by
`step * target`, so the scale settles where the controller misses `target_violation_rate` of its
budgets, and moves again when the host's speed does. The guarantee needs no model of the host: the
log scale moves by the sum of the updates, so over any T successive requests of one budget bucket
(below) during which its scale is never clipped to [min_scale, max_scale], their violation rate is
within log(max_scale / min_scale) / (step * T) of the target.

There is one scale per budget bucket (`OnlineMargin.budget_fractions`: bucket i holds the budget
fractions from the i-th value up to the next, as the LUT buckets them), so the target holds at
each budget level, not only on average, and a budget that even the fastest configuration cannot
meet (it is missed at any scale: below about 0.55 of the full configuration on micro's H200 table)
drives its own bucket's scale to `min_scale` without tightening the others. A single scale for
every budget is `budget_fractions=(0.0,)`.

The wrapped controller is not changed. `state` saves the current scales with it, so a restarted
server resumes where it was; on another host, start a fresh wrapper (the scales belong to a host).

    >>> served = OnlineMarginController(controller, OnlineMargin(target_violation_rate=0.05))  # doctest: +SKIP
    >>> action = served.select_action(observation)                                               # doctest: +SKIP
    >>> _, _, _, _, info = env.step(action)                                                       # doctest: +SKIP
    >>> served.observe(info["violation"], observation["budget_fraction"])                         # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from flexvlm_env.config import KnobGrid
from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS

from .base import CONTROLLER_CLASSES, Controller
from .lut import budget_buckets

INNER_PREFIX = "inner."


@dataclass(frozen=True)
class OnlineMargin:
    """The online margin's settings (validated here, at the boundary)."""

    target_violation_rate: float = 0.05
    """the share of budgets the served controller may miss (alpha)"""
    step: float = 0.05
    """learning rate on the log budget scale (gamma): larger follows a moving host faster and
    fluctuates more; a missed budget tightens the scale by about step * (1 - target)"""
    min_scale: float = 0.5
    """the tightest budget scale (the controller is told at least half of each budget)"""
    max_scale: float = 1.5
    """the loosest budget scale"""
    initial_scale: float = 1.0
    """the scale before the first outcome (1: the controller's own latency model)"""
    budget_fractions: tuple[float, ...] = DEFAULT_BUDGET_FRACTIONS
    """increasing lower bounds of the budget buckets, one scale each (budgets below the first
    fall in the first bucket); (0.0,) is one scale for every budget"""

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.budget_fractions)
        if not fractions or not all(math.isfinite(f) and f >= 0 for f in fractions) or any(
                b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"budget_fractions={self.budget_fractions!r} must be increasing finite numbers >= 0 "
                             "(the lower bounds of the budget buckets)")
        object.__setattr__(self, "budget_fractions", fractions)
        if not 0.0 < self.target_violation_rate < 1.0:
            raise ValueError(f"target_violation_rate={self.target_violation_rate!r} must be in (0, 1)")
        if not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step={self.step!r} must be a finite number > 0")
        if not (0.0 < self.min_scale <= self.initial_scale <= self.max_scale and math.isfinite(self.max_scale)):
            raise ValueError(f"min_scale={self.min_scale!r}, initial_scale={self.initial_scale!r}, "
                             f"max_scale={self.max_scale!r}: need 0 < min_scale <= initial_scale <= max_scale < inf")


class OnlineMarginController(Controller):
    """`controller` told `budget_scale(fraction)` x each request's budget, the scales adapted online
    (module doc). `observed` and `violations` count the outcomes per budget bucket."""

    kind = "online_margin"

    def __init__(self, controller: Controller, margin: OnlineMargin | None = None):
        if not isinstance(controller, Controller):
            raise TypeError(f"controller must be an agents Controller, got {type(controller).__name__}")
        if isinstance(controller, OnlineMarginController):
            raise ValueError("controller already has an online margin; wrap the controller it serves instead")
        super().__init__(controller.grid)
        self.controller = controller
        self.margin = margin or OnlineMargin()
        self._log_min, self._log_max = math.log(self.margin.min_scale), math.log(self.margin.max_scale)
        self._fractions = np.asarray(self.margin.budget_fractions, dtype=np.float64)
        self._log_scales = np.full(len(self._fractions), math.log(self.margin.initial_scale))
        self.observed = np.zeros(len(self._fractions), dtype=np.int64)
        self.violations = np.zeros(len(self._fractions), dtype=np.int64)

    @property
    def budget_scales(self) -> np.ndarray:
        """Per budget bucket, what a request's budget is multiplied by before the wrapped controller sees it."""
        return np.exp(self._log_scales)

    def budget_scale(self, budget_fraction: float | np.ndarray) -> float | np.ndarray:
        """The scale the budget(s) of these true fractions are told at now."""
        scales = self.budget_scales[budget_buckets(budget_fraction, self._fractions)]
        return float(scales[0]) if np.ndim(budget_fraction) == 0 else scales

    def select_indices(self, observations: Mapping[str, np.ndarray]) -> np.ndarray:
        fraction = np.asarray(observations["budget_fraction"], dtype=np.float32)  # [B, 1] (`as_batch`)
        scale = self.budget_scales[budget_buckets(fraction, self._fractions)].astype(np.float32).reshape(fraction.shape)
        told = dict(observations)
        told["budget_fraction"] = fraction * scale
        told["budget_ms"] = np.asarray(observations["budget_ms"], dtype=np.float32) * scale
        return self.controller.select_indices(told)

    def observe(self, violated: bool | Sequence[bool] | np.ndarray, budget_fraction: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Update the scales from served requests' outcomes, in serving order: `violated` True where a
        request missed its true budget (an env step's `info["violation"]`), `budget_fraction` its true
        budget fraction (the observation's, not the scaled one the controller was told). Returns the
        scales per bucket."""
        outcomes = np.asarray(violated).reshape(-1)
        if outcomes.dtype != np.bool_:
            raise ValueError(f"violated must be bools (an env step's info['violation']), got dtype {outcomes.dtype}")
        fractions = np.asarray(budget_fraction, dtype=np.float64).reshape(-1)
        if fractions.shape != outcomes.shape or not np.isfinite(fractions).all():
            raise ValueError(f"budget_fraction must be one finite fraction per outcome ({outcomes.size}), "
                             f"got {np.asarray(budget_fraction).tolist()!r}")
        alpha, step = self.margin.target_violation_rate, self.margin.step
        for missed, bucket in zip(outcomes.tolist(), budget_buckets(fractions, self._fractions).tolist()):
            moved = self._log_scales[bucket] - step * (float(missed) - alpha)
            self._log_scales[bucket] = min(self._log_max, max(self._log_min, moved))
            self.observed[bucket] += 1
            self.violations[bucket] += missed
        return self.budget_scales

    # -- serialization -------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        inner_config, inner_tensors = self.controller.state()
        config = {"margin": asdict(self.margin), "scales": self.budget_scales.tolist(), "observed": self.observed.tolist(),
                  "violations": self.violations.tolist(), "inner_kind": self.controller.kind, "inner_config": inner_config}
        return config, {INNER_PREFIX + name: tensor for name, tensor in inner_tensors.items()}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], grid: KnobGrid) -> OnlineMarginController:
        kind = config["inner_kind"]
        if kind not in CONTROLLER_CLASSES or kind == cls.kind:
            raise ValueError(f"inner_kind={kind!r} is not a controller this wrapper can serve; "
                             f"allowed: {sorted(k for k in CONTROLLER_CLASSES if k != cls.kind)}")
        module, name = CONTROLLER_CLASSES[kind].split(":")
        inner_cls = getattr(importlib.import_module(module), name)
        inner = inner_cls.from_state(config["inner_config"],
                                     {k[len(INNER_PREFIX):]: v for k, v in tensors.items() if k.startswith(INNER_PREFIX)},
                                     grid)
        margin = config["margin"]
        served = cls(inner, OnlineMargin(**{**margin, "budget_fractions": tuple(margin["budget_fractions"])}))
        served._log_scales = np.log(np.asarray(config["scales"], dtype=np.float64))
        served.observed = np.asarray(config["observed"], dtype=np.int64)
        served.violations = np.asarray(config["violations"], dtype=np.int64)
        return served
