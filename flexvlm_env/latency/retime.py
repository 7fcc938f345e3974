"""Re-time a recorded latency table on the host that serves: a factor per family and configuration.

Controllers trained in replay predict a configuration's latency as a fraction of its family's
budget reference (the table's median full-configuration latency), read from a table recorded on
one host: the guardrail of MaskablePPO, the supervised controller and the baselines, and the LUT's
table. On the serving host, budgets are fractions of that host's own reference (`FlexVLM-v0`
calibrates it at start), and a host-bound model does not keep the table's relative costs: micro's
~4 ms H200 requests ran 1.02-1.10x the table at the small configurations and 0.92-0.98x at 12
crops on two other H200 hosts (E4), enough for a controller sitting just under its budget in
replay to miss 14-48% of the 0.7 budgets live.

`time_configurations` runs a few of the table's own requests at every configuration on this host
(an untimed pass first, so a CUDA graph capture or a first use is never timed; then `repeats`
passes, each in a seeded shuffled order, as a server switches configurations). From those times:

- `host_factors`: the factor that takes a table prediction to this host's fraction of its budget
  reference: per configuration, the median over the runs of host ms / recorded ms, over the
  family's ratio of budget references (host / table). The references are the ones budgets are made
  from, so a reference calibrated low or high on the host is accounted for; a factor relative to
  the host's own full-configuration runs would miss it (on one E4 host those ran 1.055x the table
  while budgets were calibrated at 1.03x, and the factors came out 2.4% low).
- `host_residuals`: each run's host / recorded ratio over its configuration's median, the spread a
  prediction must leave room for. The table's own residuals (repeats recorded back to back, one
  configuration at a time) are far narrower than serving's: on E4's live H200 hosts, live latency
  over the re-timed prediction had a P95 of 1.17-1.27 against the table residuals' 1.04, and
  re-timed by the factors alone FlexVLM still missed 12.2% of the 0.7 budgets (8.6% with the
  host's residuals on another host, 1.1% in replay).

`agents.retime` applies both to controllers.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ..config import Config


def time_configurations(vlm, samples: Sequence, configs: Sequence[Config], repeats: int = 3, seed: int = 0,
                        warm: bool = True) -> tuple[np.ndarray, float]:
    """(float64 [repeats, R, C] end-to-end ms of each sample at each configuration on `vlm`'s
    device, seconds spent). Every (sample, configuration) pair runs `repeats` times (plus once
    untimed with `warm`), each pass over all the pairs in a seeded random order."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an int >= 1")
    if not samples or not configs:
        raise ValueError(f"samples ({len(samples)}) and configs ({len(configs)}) must both be non-empty")
    pairs = [(i, j) for i in range(len(samples)) for j in range(len(configs))]
    rng = np.random.default_rng(seed)
    times = np.zeros((repeats, len(samples), len(configs)))
    start_s = time.perf_counter()
    for n in range(-1 if warm else 0, repeats):
        for k in rng.permutation(len(pairs)):
            i, j = pairs[k]
            sample = samples[i]
            result = vlm.generate(sample.image, sample.prompt, configs[j], max_new_tokens=sample.max_new_tokens)
            if n >= 0:
                times[n, i, j] = result.latency.total_ms
    return times, time.perf_counter() - start_s


def _ratios(host_ms: np.ndarray, recorded_ms: np.ndarray) -> np.ndarray:
    """float64 [N, R, C] host / recorded ms of each run (a [R, C] `host_ms` is one pass)."""
    host = np.asarray(host_ms, dtype=np.float64)
    recorded = np.asarray(recorded_ms, dtype=np.float64)
    if host.ndim == 2:
        host = host[None]
    if recorded.ndim != 2 or host.ndim != 3 or host.shape[1:] != recorded.shape:
        raise ValueError(f"host_ms {np.shape(host_ms)} must be [repeats, requests, configs] or [requests, configs] "
                         f"over recorded_ms {recorded.shape} [requests, configs]: the same requests and configs")
    if not (np.isfinite(host).all() and np.isfinite(recorded).all() and host.min() > 0 and recorded.min() > 0):
        raise ValueError("host_ms and recorded_ms must be finite and > 0 (milliseconds)")
    return host / recorded[None]


def host_factors(host_ms: np.ndarray, recorded_ms: np.ndarray, reference_ratio: np.ndarray) -> np.ndarray:
    """float64 [F, C]: per family f and configuration c, the median over the runs of host /
    recorded latency at c (pooled over families: what changes from host to host is the
    configuration's cost) over `reference_ratio[f]`, the family's budget reference on the host
    over the table's. A table prediction (a fraction of the table's reference) times it is a
    fraction of the host's reference."""
    ratio = _ratios(host_ms, recorded_ms)
    reference = np.asarray(reference_ratio, dtype=np.float64)
    if reference.ndim != 1 or not reference.size or not (np.isfinite(reference).all() and reference.min() > 0):
        raise ValueError(f"reference_ratio={reference!r} must be a non-empty 1-D array of finite numbers > 0 "
                         "(per family, host budget reference / table budget reference)")
    return np.median(ratio.reshape(-1, ratio.shape[-1]), axis=0)[None, :] / reference[:, None]


def host_residuals(host_ms: np.ndarray, recorded_ms: np.ndarray) -> np.ndarray:
    """float64 [C, N * R]: each run's host / recorded latency over its configuration's median:
    what a re-timed prediction (`host_factors`) leaves unexplained, request by request and run by
    run, in the form of `ProfileTables.noise_factor`."""
    ratio = _ratios(host_ms, recorded_ms).reshape(-1, np.shape(recorded_ms)[-1])
    return (ratio / np.median(ratio, axis=0)[None]).T.copy()


def check_factors(factor, n_families: int, n_configs: int) -> np.ndarray:
    """`factor` as float64 [n_families, n_configs] (a [n_configs] one applies to every family), or
    a ValueError saying what is wrong with it."""
    out = np.asarray(factor, dtype=np.float64)
    if out.shape == (n_configs,):
        out = np.broadcast_to(out, (n_families, n_configs))
    if out.shape != (n_families, n_configs):
        raise ValueError(f"factor has shape {out.shape}; expected ({n_families}, {n_configs}) (per family and "
                         f"configuration) or ({n_configs},) (per configuration)")
    if not (np.isfinite(out).all() and out.min() > 0):
        raise ValueError(f"factor must be finite and > 0 everywhere (min {np.nanmin(out) if out.size else None}); "
                         "it scales each configuration's predicted latency")
    return out


def measure_host_factors(env, latency, requests_per_family: int = 3, repeats: int = 3, seed: int = 0,
                         families: Sequence[str] | None = None) -> dict:
    """`host_factors` of latency table `latency` (a shipped source's key, or a `ReplayData` built from
    your own `flexvlm-profile` tables) on the device of `env` (a `FlexVLM-v0`, after its
    warm-up and calibration), from the first `requests_per_family` requests of each family it
    serves (or of `families`) that are in the table's train half (the half controllers are fitted
    on, so held-out requests stay unseen), each timed at every configuration of the grid. Families
    the env does not serve get the median reference ratio of those it does.

    Returns a JSON-serialisable report: `factor` ([F][C], families in `FAMILY_NAMES` order),
    `residual` ([C][runs], `host_residuals`), `reference_ratio` per family, `config_ratio` ([C]
    median host / recorded latency), the requests, `repeats`, `seconds` and summary figures."""
    from ..envs.core import FAMILY_NAMES
    from ..profiles import load_replay_data
    from ..profiles.replay import ReplayData, request_split_mask

    if isinstance(requests_per_family, bool) or not isinstance(requests_per_family, int) or requests_per_family < 1:
        raise ValueError(f"requests_per_family={requests_per_family!r} must be an int >= 1")
    live = env.unwrapped
    data = latency if isinstance(latency, ReplayData) else load_replay_data(quality="micro", latency=latency)
    source = data.metadata.get("latency_source", "given ReplayData")
    if live.grid != data.grid:
        raise ValueError(f"the env's grid {live.grid} is not the grid of latency table {source!r} ({data.grid})")
    train = request_split_mask(data.request_ids, data.families, "train")
    row = {rid: i for i, rid in enumerate(data.request_ids) if train[i]}
    chosen, taken = [], {}
    for sample in live.samples:
        wanted = families is None or sample.family in families
        if wanted and sample.request_id in row and taken.get(sample.family, 0) < requests_per_family:
            chosen.append(sample)
            taken[sample.family] = taken.get(sample.family, 0) + 1
    if not chosen:
        raise ValueError(f"none of the env's requests is in the train half of latency table {source!r}: serve the "
                         "requests the table recorded (the shipped tables: procedural val split, task_seed 0)")
    host_ms, seconds = time_configurations(live.vlm, chosen, live.grid.configs(), repeats, seed)  # [N, R, C]
    recorded = data.total_ms[[row[s.request_id] for s in chosen]].astype(np.float64)
    table_reference = data.family_full_latency_ms()
    served = {f: live.full_latency_ms[f] / table_reference[f] for f in live.full_latency_ms}
    fallback = float(np.median(list(served.values())))
    reference_ratio = np.array([served.get(f, fallback) for f in FAMILY_NAMES])
    factor = host_factors(host_ms, recorded, reference_ratio)
    residual = host_residuals(host_ms, recorded)
    config_ratio = np.median((host_ms / recorded[None]).reshape(-1, recorded.shape[1]), axis=0)
    return {"latency_source": source, "families": list(FAMILY_NAMES), "factor": factor.tolist(),
            "residual": residual.tolist(), "residual_p95_median": float(np.median(np.quantile(residual, 0.95, axis=1))),
            "reference_ratio": dict(zip(FAMILY_NAMES, reference_ratio.tolist())), "config_ratio": config_ratio.tolist(),
            "requests": [s.request_id for s in chosen], "repeats": repeats, "seconds": seconds,
            "config_ratio_full": float(config_ratio[data.full_index]),
            "factor_min": float(factor.min()), "factor_median": float(np.median(factor)), "factor_max": float(factor.max())}


def check_residuals(residual, n_configs: int) -> np.ndarray:
    """`residual` as float64 [n_configs, M >= 1] (`host_residuals`), or a ValueError."""
    out = np.asarray(residual, dtype=np.float64)
    if out.ndim != 2 or out.shape[0] != n_configs or out.shape[1] < 1:
        raise ValueError(f"residual has shape {out.shape}; expected ({n_configs}, M >= 1): runs per configuration")
    if not (np.isfinite(out).all() and out.min() > 0):
        raise ValueError("residual must be finite and > 0 everywhere (ratios of a run to its configuration's median)")
    return out
