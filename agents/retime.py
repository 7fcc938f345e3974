"""Serve a controller on another host: its latency predictions re-timed there.

A controller fitted on a recorded table predicts each configuration's latency as a fraction of
its family's budget reference on the table's host. `flexvlm_env.latency.retime.measure_host_factors`
times a few of the table's requests at every configuration on the serving host and gives a factor
per family and configuration and the spread of the runs around it (residuals);
`retime_controller` returns a copy of the controller whose predictions use them. What the
controller learned (its policy or network, its table's qualities) is kept; only the latency side
moves:

- controllers with a latency guardrail (MaskablePPO, supervised, the knob-path baselines): the
  guardrail rebuilt, at its quantile, from the profiles re-timed by the factors with the host's
  residuals (`ProfileTables.retimed`); with factors alone, its predicted fractions times the
  factors (`LatencyGuardrail.rescaled`), which needs no profiles;
- the LUT: refitted on the re-timed profiles, since its table stores choices, not latencies;
- controllers without a latency model (unmasked PPO, the DPO/GRPO language models, random): a
  ValueError, as there is nothing to re-time.

    >>> report = measure_host_factors(env, latency="micro-h200-measured")          # doctest: +SKIP
    >>> served = retime_controller(controller, report["factor"], profiles, report["residual"])  # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

from flexvlm_env.envs.core import FAMILY_NAMES
from flexvlm_env.latency.retime import check_factors

from .base import Controller
from .guardrail import LatencyGuardrail
from .lut import LUTController
from .profiles import ProfileTables

GUARDRAIL_TENSOR = "guardrail.predicted_fraction"


def retime_controller(controller: Controller, factor: np.ndarray, profiles: ProfileTables | None = None,
                     residual: np.ndarray | None = None) -> Controller:
    """A copy of `controller` whose latency predictions are re-timed by `factor` ([F, C] per family
    and configuration, or [C]) and, if given, the host's `residual` [C, M] (`profiles`: the tables
    the controller was fitted on; needed for a LUT and with `residual`). The original is unchanged."""
    factor = check_factors(factor, len(FAMILY_NAMES), len(controller.grid))
    if profiles is None and (residual is not None or isinstance(controller, LUTController)):
        raise ValueError(f"profiles=None: re-timing a {controller.kind!r} controller"
                         f"{' with residuals' if residual is not None else ''} rebuilds its latency model from the "
                         "profiles it was fitted on, so give them (ProfileTables.load(latency=<its latency source>))")
    if profiles is not None and profiles.grid != controller.grid:
        raise ValueError(f"profiles cover grid {profiles.grid}, the controller decides on {controller.grid}")
    if isinstance(controller, LUTController):
        return LUTController.fit(profiles.retimed(factor, residual), controller.fractions.tolist(),
                                 controller.max_violation_rate)
    config, tensors = controller.state()
    if GUARDRAIL_TENSOR not in tensors:
        raise ValueError(f"a {controller.kind!r} controller predicts no latency (no guardrail), so there is nothing to "
                         "re-time; re-timing applies to controllers with a guardrail and to the LUT")
    guardrail = LatencyGuardrail.from_state(config["guardrail"], tensors)
    if residual is None:
        guardrail = guardrail.rescaled(factor)
    else:
        guardrail = LatencyGuardrail.from_profiles(profiles.retimed(factor, residual), guardrail.quantile)
    _, new = guardrail.state()
    return type(controller).from_state(config, {**tensors, **new}, controller.grid)
