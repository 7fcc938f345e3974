"""`FlexVLM-v0`: the environment in which every step runs one request through the model, live.

The request pool is a set of task samples (procedural by default), the model is a loaded `VLM`
(the shipped micro model by default, runnable on a laptop CPU), quality is the family metric of
the generated answer and latency is the runtime's own stage record (CUDA events on a GPU,
`perf_counter` on a CPU). Budgets are fractions of each family's full-configuration latency,
measured at construction on this device unless given.
"""
from __future__ import annotations

import math
import numbers
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, KnobGrid
from ..features import image_features, prompt_features
from ..metrics import score
from ..model.args import PRESETS
from ..model.runtime import VLM, load_model
from ..model.timing import STAGE_FIELDS
from ..tasks import SPLITS, load_samples
from .core import (
    DEFAULT_BUDGET_FRACTIONS,
    DEFAULT_EPISODE_LENGTH,
    FAMILY_NAMES,
    FlexVLMCoreEnv,
    check_core_arguments,
    check_families,
    check_grid,
    check_positive_int,
)

WARMUPS = ("auto", "all", "full", "none")


class FlexVLMEnv(FlexVLMCoreEnv):
    """Choose an inference configuration per request; the model answers it live and is timed.

    **Description.** Each step serves one vision-language request under a latency budget: the
    agent picks a configuration of the model's three knobs (image crops, experts per token,
    active decoder blocks), the model generates the answer at that configuration, the answer is
    scored by the family's metric and the request is timed on this machine.

    **Action space.** `MultiDiscrete(grid.shape)` (7 x 4 x 5 by default): indices into
    `grid.crops`, `grid.top_k`, `grid.active_blocks` (config index c = row-major position in
    `grid.configs()`). Actions must be integer arrays of shape (3,); other dtypes, shapes or
    out-of-range indices raise ValueError. `DiscreteKnobs` flattens it to `Discrete(140)`.

    **Observation space.** A single-level `Dict`: `family` Discrete(9) (order of
    `flexvlm_env.tasks.families.FAMILIES`); `budget_ms` Box(1,); `budget_fraction` Box(1,);
    `prompt` Box(4,) (`flexvlm_env.features.prompt_features`); `image` Box(6,)
    (`image_features`), all float32. The features are computed when the request is observed,
    and that time is the controller overhead reported in `info["controller_overhead_ms"]`.

    **Reward.** `quality − λ · max(0, latency − budget) / budget` (`QualityMinusOvershoot`;
    `penalty="squared"` squares the overshoot term). Quality is the family metric in [0, 1].

    **Episode.** `episode_length` requests drawn uniformly with replacement from the pool, each
    with a budget = a fraction drawn from `budget_fractions` x its family's full-configuration
    latency; `terminated` after the last request (never truncated), the final observation repeats
    the last request. `reset(options=...)` pins the first request: `request_id` (or
    `request_index`) and `budget_ms` (or `budget_fraction`). `info`: `config`, `latency` (stage
    dict: preprocess_ms, vision_encoder_ms, projector_ms, prefill_ms, decode_ms, total_ms),
    `latency_ms`, `quality`, `answer`, `violation`, `request_id`, `family`, `budget_ms`,
    `controller_overhead_ms`, `tokens` (vision/prompt/layout/output counts). If the model fails
    on a request (out of memory, a runtime error), `info["error"]` holds the message, quality is 0,
    latency is 2 x the budget (so the reward penalises it) and the episode goes on.

    **Arguments.**

    - `model`, `weights`, `device`, `dtype`: passed to `flexvlm_env.load_model` (default: the
      shipped micro model on CUDA if available, else CPU).
    - `vlm`: an already-loaded `VLM` to use instead (shares one model between envs and tests).
    - `families`: families to serve (default: all nine); `split`: "train", "val" or "test";
      `source`: "procedural" (default), "hub" or a local dataset directory (see
      `flexvlm_env.tasks.load_samples`); `requests_per_family` (default 20) and `task_seed`.
    - `budget_fractions`: default (0.35, 0.5, 0.7, 0.85, 1.0); `lam`, `penalty`: the reward.
    - `episode_length`: requests per episode (default 16); `grid`: a `KnobGrid` (default 7x4x5).
    - `full_latency_ms`: dict family -> full-configuration latency (ms) used for budgets. None
      calibrates at construction (after the warm-up): the median full-configuration latency of
      `calibration_requests` (default 3) requests per family, i.e. 3 x 9 = 27 full-configuration
      requests: about 2-3 s for micro on a laptop CPU, a few seconds for MolmoE-1B on a GPU.
      Pass the dict (`env.unwrapped.full_latency_ms` of an earlier env) to skip it.
    - `warmup`: untimed requests at construction so that no measured step pays for a first use:
      "all" (one short request per configuration; on CUDA this captures every configuration's
      graphs, 140 short requests), "full" (one request at the full configuration), "none", or
      "auto" (default: "all" on CUDA, "full" on CPU). `env.unwrapped.warmup_s` says what it cost.
    - `render_mode`: None or "ansi".

    **Vector envs.** `gym.make_vec("FlexVLM-v0", num_envs=n, vectorization_mode="sync")` runs the
    copies in turn. For `"async"`, pass `vector_kwargs={"context": "spawn"}`: torch's CPU thread
    pool is not fork-safe, so forked workers of a process that has already run the model hang.
    Each worker builds its own model from the arguments (and, on one GPU, they share it in time,
    which changes what is measured).

    **Latency source.** Measured on this device by the runtime (`result.latency.total_ms`, the
    request's start to its last token; stage boundaries by CUDA events on GPU, `perf_counter` on
    CPU). One run per step: the reward sees the noise a deployed controller would.

    **Determinism.** Not deterministic (registered `nondeterministic=True`): the seed fixes the
    requests and budgets, and answers are deterministic for a given device and dtype, but latency
    is measured (`reward_deterministic=False`, `reward_platform_dependent=True`).

    **Version history.** v0: initial version.

    Example (micro on a CPU; about 0.1 s per step):

    >>> import gymnasium as gym, numpy as np
    >>> import flexvlm_env.envs
    >>> env = gym.make("FlexVLM-v0", device="cpu", families=["tally_qa"], requests_per_family=2,
    ...                full_latency_ms={"tally_qa": 70.0}, episode_length=2)
    >>> observation, info = env.reset(seed=0)
    >>> info["family"], observation["family"]
    ('tally_qa', np.int64(2))
    >>> observation, reward, terminated, truncated, info = env.step(np.array([0, 0, 0]))
    >>> info["config"]
    {'crops': 1, 'top_k': 1, 'active_blocks': 8}
    >>> info["latency_ms"] > 0 and info["controller_overhead_ms"] > 0
    True
    """

    latency_deterministic = False
    latency_platform_dependent = True

    def __init__(
        self,
        model: str = "micro",
        weights: str | Path | None = None,
        device=None,
        dtype=None,
        vlm: VLM | None = None,
        families: Sequence[str] | None = None,
        split: str = "val",
        source: str | Path = "procedural",
        requests_per_family: int = 20,
        task_seed: int = 0,
        budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
        lam: float = 1.0,
        penalty: str = "linear",
        episode_length: int = DEFAULT_EPISODE_LENGTH,
        grid: KnobGrid | None = None,
        full_latency_ms: Mapping[str, float] | None = None,
        calibration_requests: int = 3,
        warmup: str = "auto",
        render_mode: str | None = None,
    ):
        # Cheap checks first, so a typo fails before a model is loaded or a request is run.
        check_core_arguments(budget_fractions, episode_length, lam, penalty, render_mode, self.metadata["render_modes"])
        families = check_families(families)
        grid = check_grid(grid)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; allowed: {SPLITS}")
        requests_per_family = check_positive_int("requests_per_family", requests_per_family)
        calibration_requests = check_positive_int("calibration_requests", calibration_requests)
        if isinstance(task_seed, bool) or not isinstance(task_seed, numbers.Integral) or task_seed < 0:
            raise ValueError(f"task_seed={task_seed!r} must be an int >= 0")
        task_seed = int(task_seed)  # a NumPy integer would not go into the recording's JSON
        if full_latency_ms is not None:
            full_latency_ms = _check_full_latency(full_latency_ms, families)
        if warmup not in WARMUPS:
            raise ValueError(f"warmup={warmup!r} is not valid; allowed: {WARMUPS}")
        if vlm is None:
            if model not in PRESETS:  # load_model would name its own argument, preset
                raise ValueError(f"model={model!r} is not known; allowed: {sorted(PRESETS)}")
            vlm = load_model(model, weights, device, dtype)
        elif not isinstance(vlm, VLM):
            raise ValueError(f"vlm={type(vlm).__name__} must be a flexvlm_env VLM (from load_model) or None")
        _check_grid_fits(grid, vlm)
        self.vlm = vlm

        self.samples = []
        for family in families:
            loaded = load_samples(family, source, split, n=requests_per_family, seed=task_seed)
            if not loaded:
                raise ValueError(f"source={source!r} has no {split!r} samples of family {family!r}")
            self.samples.extend(loaded)
        self._configs = grid.configs()
        self.warmup_s = self._warm_up(grid, warmup)
        self.calibration: dict[str, Any] = {"calibrated": full_latency_ms is None}
        if full_latency_ms is None:
            full_latency_ms = self._calibrate(grid.full, families, calibration_requests)
        self.full_latency_ms = dict(full_latency_ms)
        family_index = np.array([FAMILY_NAMES.index(s.family) for s in self.samples], dtype=np.int64)
        self._setup_core(
            grid=grid,
            request_ids=[s.request_id for s in self.samples],
            family_index=family_index,
            full_latency_ms=np.array([self.full_latency_ms[s.family] for s in self.samples]),
            budget_fractions=budget_fractions,
            episode_length=episode_length,
            lam=lam,
            penalty=penalty,
            render_mode=render_mode,
        )
        self._overhead_ms = [0.0] * self.episode_length
        self._init_kwargs = {
            "model": vlm.args.name,
            "weights": None if weights is None else str(weights),
            "device": str(vlm.device),
            "dtype": str(vlm.dtype).removeprefix("torch."),
            "families": list(families),
            "split": split,
            "source": str(source),
            "requests_per_family": requests_per_family,
            "task_seed": task_seed,
            "budget_fractions": list(self.budget_fractions),
            "lam": self.reward_fn.lam,  # a float: a NumPy scalar would reach the JSON as a string
            "penalty": self.reward_fn.penalty,
            "episode_length": self.episode_length,
            "grid": {"crops": list(grid.crops), "top_k": list(grid.top_k), "active_blocks": list(grid.active_blocks)},
            "full_latency_ms": dict(self.full_latency_ms),
        }

    def recording_kwargs(self) -> dict[str, Any]:
        """JSON-serializable kwargs that rebuild this env (calibrated budgets included)."""
        return dict(self._init_kwargs)

    def _warm_up(self, grid: KnobGrid, warmup: str) -> float:
        """Run untimed requests so that no measured step pays for a first use (seconds spent)."""
        if warmup == "auto":
            warmup = "all" if self.vlm.device.type == "cuda" else "full"
        start_s = time.perf_counter()
        if warmup == "all":
            # One short request per configuration: on CUDA this captures each configuration's
            # graphs (vision per crop count, prefill and decode per block plan and top_k).
            self.vlm.warmup(self._configs, image=self.samples[0].image)
        if warmup in ("all", "full"):
            first = self.samples[0]
            self.vlm.generate(first.image, first.prompt, grid.full, max_new_tokens=first.max_new_tokens)
        return time.perf_counter() - start_s

    def _calibrate(self, full: Config, families: Sequence[str], n_requests: int) -> dict[str, float]:
        """Median full-configuration latency per family on this device (after the warm-up)."""
        start_s = time.perf_counter()
        medians = {}
        for family in families:
            pool = [s for s in self.samples if s.family == family]
            latencies = [
                self.vlm.generate(s.image, s.prompt, full, max_new_tokens=s.max_new_tokens).latency.total_ms
                for s in (pool[i % len(pool)] for i in range(n_requests))
            ]
            medians[family] = float(statistics.median(latencies))
        self.calibration.update(
            requests_per_family=n_requests, seconds=time.perf_counter() - start_s, estimator="median"
        )
        return medians

    def _observation(self, request: int, t: int) -> dict[str, Any]:
        sample = self.samples[request]
        start_s = time.perf_counter()
        prompt = prompt_features(sample.prompt)
        image = image_features(sample.image)
        self._overhead_ms[t] = (time.perf_counter() - start_s) * 1e3
        return {
            "budget_fraction": self._budget_fractions[t].copy(),
            "budget_ms": self._budgets_ms[t].copy(),
            "family": self._family_index[request],
            "image": image,
            "prompt": prompt,
        }

    def _run(self, request: int, config: int, t: int):
        sample = self.samples[request]
        extra: dict[str, Any] = {"controller_overhead_ms": self._overhead_ms[t]}
        try:
            result = self.vlm.generate(sample.image, sample.prompt, self._configs[config], max_new_tokens=sample.max_new_tokens)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if self.vlm.device.type == "cuda":
                torch.cuda.empty_cache()  # give the next request the memory this one failed to get
            extra["error"] = f"{type(error).__name__}: {error}"
            # A failed request answered nothing and, for the reward, took twice its budget.
            return 0.0, "", 2.0 * float(self._budgets_ms_f64[t]), [0.0] * len(STAGE_FIELDS), extra
        record = result.latency
        extra["tokens"] = asdict(result.tokens)
        stage_ms = [getattr(record, name) for name in STAGE_FIELDS]
        return float(score(sample, result.text)), result.text, float(record.total_ms), stage_ms, extra


def _check_full_latency(full_latency_ms: Any, families: Sequence[str]) -> dict[str, float]:
    if not isinstance(full_latency_ms, Mapping):
        raise ValueError(f"full_latency_ms={full_latency_ms!r} must be a dict family -> ms, or None to calibrate")
    missing = [f for f in families if f not in full_latency_ms]
    if missing:
        raise ValueError(f"full_latency_ms={dict(full_latency_ms)!r} lacks families {missing}; give one value per served family")
    out = {}
    for family in families:
        value = full_latency_ms[family]
        # numbers.Real: NumPy scalars too (the replay tables' latencies are float32)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"full_latency_ms[{family!r}]={value!r} must be a finite number > 0 (milliseconds)")
        out[family] = float(value)
    return out


def _check_grid_fits(grid: KnobGrid, vlm: VLM) -> None:
    args = vlm.args
    limits = {"crops": args.max_crops, "top_k": args.n_experts, "active_blocks": args.n_layers}
    for name, limit in limits.items():
        largest = getattr(grid, name)[-1]
        if largest > limit:
            raise ValueError(f"grid.{name}={getattr(grid, name)} exceeds this model's limit {limit}; allowed: 1..{limit}")
