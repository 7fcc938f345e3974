"""E4: end-to-end system evaluation of FlexVLM's controller against the baselines (EXPERIMENTS.md E4).

    python scripts/e4_system_eval.py                      # replay, both latency sources (CPU, ~2 min)
    python scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 420   # GPU
    python scripts/e4_system_eval.py --live-records PATH/e4_live_records.json   # replay + live analysis

Replay mode: for each latency source (`--sources`: molmoe-1b H100 and micro H200 measured) it
fits the controllers on that source's train half (FlexVLM = MaskablePPO through `trainers.ppo`,
the LUT, the five baselines; saved under `--controllers-dir/<source>/<method>` and reused when
present), serves every held-out request x budget fraction once per method on `FlexVLMReplay-v0`
(timed decision, one execution), and runs FlexVLM's operating curve at every fraction (budgets told
x 0.8..6, violations against the true budget) for the "at equal or lower violation rate"
comparisons: E4's bar at fractions 0.5 and 0.35 (`bar_check`) and issue [controllers]' bar, +5
points of retention over the best single-knob baseline averaged over the five fractions
(`controllers_bar`, under each source's `bar`).

Live mode (`--live`): loads the controllers of the micro H200 measured replay source, builds `FlexVLM-v0`
(micro on `--device`; budgets = fractions of the full latency it calibrates on that device) and
serves the first `--live-per-family` held-out requests of each family x fractions x methods, request
by request until `--time-limit-s` (counted from the start, setup included); steps that captured a CUDA graph are executed again.
With `--retime-per-family N` (default 3) FlexVLM, the LUT and greedy are also served re-timed on
that host (`agents.retime`, from N train-half requests per family timed at every configuration
before serving), as methods `<method>+retimed`. With `--online-target A` (default 0.05) those
methods, as trained and re-timed, are served a second time with an online budget margin
(`agents.online`: the budget each is told adapted after every outcome toward a violation rate A),
as `<method>+online`. Writes only `--out-dir/e4_live_records.json`; a replay-mode run with
`--live-records` adds the live metrics, the live-minus-replay differences on the same requests,
the re-timed methods against the same methods as trained, and the online margins against none.

Writes (replay mode) to `--out-dir` (default results/): `e4_summary.json` (headline numbers, bars,
metrics per source/method/fraction, operating curves, live comparison), `e4_records_replay.parquet`
(one row per served case), `e4_live_records.json.gz` (the live records, gzipped, when given) and `figures/e4_*.png`.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS
from flexvlm_env.experiments import system_eval as e4
from flexvlm_env.experiments.common import parse_script_args, quick_out_dir, read_json, run_header, write_json
from flexvlm_env.profiles.loading import check_source

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    quick: bool = False
    """smoke run: a short FlexVLM training, 40 held-out requests, two scales; outputs still complete"""
    out_dir: Path = ROOT / "results"
    """where the summary, records and figures go (live mode: only e4_live_records.json)"""
    sources: tuple[str, ...] = e4.SOURCES
    """replay latency sources (each gets its own controllers, trained on its train half; any shipped source)"""
    controllers_dir: Path = ROOT / "results/e4_controllers"
    """saved controllers, <dir>/<source>/<method> (reused when complete; the live run loads them)"""
    runs_dir: Path = ROOT / "runs/e4"
    """trainer run directories (FlexVLM's MaskablePPO)"""
    seed: int = 0
    """seed of the FlexVLM trainer, the replay residual draws and the live subset"""
    total_env_steps: int = 126_000
    """FlexVLM (MaskablePPO) training env steps (E5: 126,000 gives its best held-out results)"""
    train_budget_fractions: tuple[float, ...] = e4.TRAIN_BUDGET_FRACTIONS
    """FlexVLM's training budgets (fractions of full latency). Past 1.0 it learns to spend a loose
    budget on the full configuration; trained only up to 1.0, a policy told a looser budget
    extrapolates (one seed stayed at 0.95 retention when told 6x the budget)"""
    retrain: bool = False
    """fit the controllers again even if saved ones exist"""
    budget_fractions: tuple[float, ...] = DEFAULT_BUDGET_FRACTIONS
    """budget fractions of the family's full-configuration latency"""
    n_requests: int | None = None
    """held-out requests per family in replay (None: all 100 per family)"""
    budget_scales: tuple[float, ...] = e4.BUDGET_SCALES
    """FlexVLM operating curve: budget told to the controller = scale x the true budget"""
    live: bool = False
    """run the live part (FlexVLM-v0 with micro on --device) and write e4_live_records.json only"""
    device: str = "cpu"
    """live mode: torch device (cuda on the H100)"""
    dtype: str | None = None
    """live mode: model dtype (None: the runtime's default for the device)"""
    live_per_family: int = 40
    """live mode: held-out requests per family (x fractions x methods)"""
    calibration_requests: int = 10
    """live mode: full-configuration requests per family the env's budgets are calibrated on"""
    retime_per_family: int = 3
    """live mode: also serve FlexVLM, the LUT and greedy re-timed on this host (`agents.retime`), as
    methods `<method>+retimed`, from this many train-half requests per family timed at every
    configuration after the warm-up (0: no re-timed methods)"""
    retime_repeats: int = 3
    """live mode: timed passes over the re-timing requests (after one untimed pass)"""
    online_target: float = 0.05
    """live mode: also serve FlexVLM, the LUT and greedy (as trained and re-timed) with an online
    budget margin aiming at this violation rate per budget fraction (`agents.online`), as methods
    `<method>+online` (0: none)"""
    online_step: float = 0.05
    """live mode: the online margin's learning rate on its log budget scale"""
    time_limit_s: float = 230.0
    """live mode: stop serving new requests once the live step (setup included) has run this many seconds"""
    live_records: Path | None = None
    """replay mode: a live run's e4_live_records.json to analyse with the replay results"""
    pattern_probe: bool = False
    """run only the serving-pattern probe (micro on --device; same pairs config-major, switching, and
    switching with host idle gaps) and write e4_serving_pattern.json to --out-dir"""
    pattern_file: Path | None = ROOT / "results/device/e4_serving_pattern_h200.json"
    """replay mode with --live-records: a serving-pattern probe's output to include in the summary
    (default: the probe on the H200, where micro's live runs are served)"""
    recheck_table: Path | None = None
    """replay mode with --live-records: a `flexvlm-profile requests` table re-measured on another GPU
    instance (column omp_num_threads), compared with the recorded table on the same (request,
    config) like the live records are: separates the instance from the serving pattern (the one
    kept, results/device/e4_profile_recheck_h100.parquet, is an H100 re-measurement of an earlier table)"""

    def validate(self) -> None:
        for source in self.sources:
            check_source("--sources", source)
        if not self.sources:
            raise ValueError("--sources is empty; give at least one of " + str(list(e4.SOURCES)))
        if not self.budget_fractions or any(not 0 < f <= 1 for f in self.budget_fractions):
            raise ValueError(f"--budget-fractions={self.budget_fractions!r} must be non-empty, each in (0, 1]")
        if not self.train_budget_fractions or any(not 0 < f <= 10 for f in self.train_budget_fractions):
            raise ValueError(f"--train-budget-fractions={self.train_budget_fractions!r} must be non-empty, each in (0, 10]")
        if self.total_env_steps < 16:
            raise ValueError(f"--total-env-steps={self.total_env_steps} must be >= 16")
        if self.n_requests is not None and self.n_requests < 1:
            raise ValueError(f"--n-requests={self.n_requests} must be >= 1 or None (all)")
        if not self.budget_scales or 1.0 not in self.budget_scales or any(not s > 0 for s in self.budget_scales):
            raise ValueError(f"--budget-scales={self.budget_scales!r} must be numbers > 0 and include 1.0")
        if self.retime_per_family < 0 or self.retime_repeats < 1:
            raise ValueError(f"--retime-per-family={self.retime_per_family} must be >= 0 (0: no re-timing) and "
                             f"--retime-repeats={self.retime_repeats} >= 1")
        if not 0 <= self.online_target < 1:
            raise ValueError(f"--online-target={self.online_target} must be in [0, 1) (0: no online margins)")
        if self.online_target > 0:
            from agents.online import OnlineMargin

            OnlineMargin(target_violation_rate=self.online_target, step=self.online_step)  # names a bad --online-step
        if self.live_per_family < 1 or self.calibration_requests < 1:
            raise ValueError(f"--live-per-family={self.live_per_family} and --calibration-requests="
                             f"{self.calibration_requests} must be >= 1")
        if not self.time_limit_s > 0:
            raise ValueError(f"--time-limit-s={self.time_limit_s} must be > 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device={self.device!r}; allowed: cpu, cuda, cuda:N")
        if self.live_records is not None and not Path(self.live_records).is_file():
            raise ValueError(f"--live-records={self.live_records} is not a file (a live run's e4_live_records.json)")
        if self.live and self.live_records is not None:
            raise ValueError("--live and --live-records are separate steps: run the live part, then analyse it")


def quick_overrides(args: Args) -> Args:
    if args.quick:
        args.total_env_steps = min(args.total_env_steps, 64)
        args.n_requests = 4 if args.n_requests is None else args.n_requests
        args.budget_scales = (0.9, 1.0, 2.0)
        args.live_per_family = min(args.live_per_family, 1)
        args.calibration_requests = 1
        args.retime_per_family = min(args.retime_per_family, 1)
        args.retime_repeats = 1
        args.retrain = True
        if args.controllers_dir == Args.controllers_dir:  # never overwrite the full run's controllers
            args.controllers_dir = args.runs_dir / "controllers_quick"
    return args


def run_live(args: Args) -> Path:
    from flexvlm_env.benchmarking import device_info

    dirs = {m: args.controllers_dir / e4.LIVE_SOURCE / m for m in e4.METHODS}
    missing = [str(d) for d in dirs.values() if not (d / "controller.json").exists()]
    if missing:
        raise FileNotFoundError(f"no saved controllers {missing}: run the replay mode first (it saves them)")
    controllers = e4.load_controllers(dirs)
    started = time.perf_counter()
    env = e4.make_live_env(args.device, 200, args.calibration_requests, args.dtype)
    setup_s = time.perf_counter() - started
    from flexvlm_env.profiles.replay import request_split_mask

    pool = list(env.unwrapped.request_ids)
    families = [rid.split("/")[0] for rid in pool]
    heldout = [rid for rid, h in zip(pool, request_split_mask(pool, families, "heldout")) if h]
    families_wanted = None
    if args.quick:  # two families, one request each: seconds on a CPU
        families_wanted = sorted(set(families))[:2]
        heldout = [rid for rid in heldout if rid.split("/")[0] in families_wanted]
    chosen = e4.heldout_subset(heldout, args.live_per_family, args.seed)
    fractions = args.budget_fractions if not args.quick else (0.5, 1.0)
    retiming = None
    if args.retime_per_family > 0:
        controllers, retiming = e4.add_retimed(controllers, env, args.retime_per_family, args.retime_repeats,
                                               args.seed, families_wanted)
        print(f"re-timed on this host in {retiming['seconds']:.0f} s: factors {retiming['factor_min']:.3f}-"
              f"{retiming['factor_max']:.3f} (median {retiming['factor_median']:.3f})")
    online = None
    if args.online_target > 0:
        from agents.online import OnlineMargin

        margin = OnlineMargin(target_violation_rate=args.online_target, step=args.online_step,
                              budget_fractions=tuple(sorted(fractions)))
        controllers = e4.add_online(controllers, margin)
        online = dataclasses.asdict(margin)
    serving_started = time.perf_counter()
    # the limit covers the whole live step (model load, warm-up, calibration, serving)
    remaining_s = max(1.0, args.time_limit_s - (time.perf_counter() - started))
    records, finished = e4.serve(controllers, env, chosen, fractions, args.seed, remaining_s,
                                 redo_if=e4.graph_capture_detector(env))
    unwrapped = env.unwrapped
    out = write_json(args.out_dir / "e4_live_records.json", {
        "experiment": "E4-live", "device": device_info(unwrapped.vlm.device), "source_controllers": e4.LIVE_SOURCE,
        "env": unwrapped.recording_kwargs(), "warmup_s": unwrapped.warmup_s, "calibration": unwrapped.calibration,
        "setup_s": setup_s, "serving_s": time.perf_counter() - serving_started, "finished": finished,
        "requests_planned": chosen, "requests_served": list(dict.fromkeys(r["request_id"] for r in records)),
        "fractions": list(fractions), "records": records,
        "graph_captures_redone": int(sum(r["redone"] for r in records)), "retiming": retiming, "online_margin": online,
    })
    print(f"live: {len(records)} executions of {len(set(r['request_id'] for r in records))} requests on "
          f"{unwrapped.vlm.device} ({'finished' if finished else 'stopped at the time limit'}), wrote {out}")
    return out


def run_pattern_probe(args: Args) -> Path:
    """The serving-pattern probe on --device (see `system_eval.serving_pattern_probe`)."""
    from flexvlm_env import load_model
    from flexvlm_env.benchmarking import device_info
    from flexvlm_env.config import KnobGrid
    from flexvlm_env.tasks import FAMILIES, load_samples

    vlm = load_model("micro", device=args.device, dtype=args.dtype)
    per_family = 1 if args.quick else 4
    samples = [s for f in sorted(FAMILIES) for s in load_samples(f, "procedural", "val", per_family, 0)]
    grid = KnobGrid().configs()
    rng = np.random.default_rng(args.seed)
    configs = [grid[i] for i in sorted(rng.choice(len(grid), size=2 if args.quick else 20, replace=False))]
    probe = e4.serving_pattern_probe(vlm, samples, configs, gap_ms=5.0, seed=args.seed)
    out = write_json(args.out_dir / "e4_serving_pattern.json", {"experiment": "E4-serving-pattern", "device": device_info(vlm.device),
                                                                "configs": [[c.crops, c.top_k, c.active_blocks] for c in configs],
                                                                "samples_per_family": per_family, **probe})
    print({k: v for k, v in probe["patterns"].items()}, "wrote", out)
    return out


def recheck_ratio(path: Path | None) -> dict | None:
    """`same_config_latency_ratio` of a re-measured profile table, per host-thread setting."""
    if path is None or not Path(path).is_file():
        return None
    import pandas as pd

    frame = pd.read_parquet(path)
    records = [{"method": f"profile CLI, {int(r.omp_num_threads)} host threads", "request_id": r.request_id, "crops": int(r.crops),
                "top_k": int(r.top_k), "active_blocks": int(r.active_blocks), "latency_ms": float(r.total_ms)}
               for r in frame.itertuples()]
    return {"table": Path(path).name, **e4.same_config_latency_ratio(records, e4.LIVE_SOURCE)}


def main(args: Args) -> dict | Path:
    quick_out_dir(args)
    args = quick_overrides(args)
    args.validate()
    import torch

    torch.set_num_threads(1)
    if args.live:
        return run_live(args)
    if args.pattern_probe:
        return run_pattern_probe(args)
    import gymnasium as gym
    import pandas as pd

    import flexvlm_env  # noqa: F401

    replay, all_records = {}, []
    # A live run's records: the JSON the GPU run writes, or the gzipped copy kept in results/.
    # Times rounded to 100 ns before anything reads them, so the kept copy reproduces the summary.
    payload = e4.compact_live_records(read_json(args.live_records)) if args.live_records is not None else None
    live_ids = set(payload["requests_served"]) if payload is not None else set()
    for source in args.sources:
        t0 = time.perf_counter()
        dirs = e4.train_controllers(source, args.controllers_dir, args.runs_dir, args.seed, args.total_env_steps,
                                    reuse=not args.retrain, budget_fractions=args.train_budget_fractions)
        train_s = time.perf_counter() - t0
        controllers = e4.load_controllers(dirs)
        env = gym.make("FlexVLMReplay-v0", latency=source, split="heldout", episode_length=1)
        ids = e4.heldout_subset(list(env.unwrapped.request_ids), args.n_requests, args.seed)
        if source == e4.LIVE_SOURCE and live_ids:  # the replay side of the live comparison needs them all
            ids += [rid for rid in env.unwrapped.request_ids if rid in live_ids and rid not in set(ids)]
        t0 = time.perf_counter()
        records, _ = e4.serve(controllers, env, ids, args.budget_fractions, args.seed, shuffle=False)
        curve_records = e4.operating_curve(controllers["flexvlm"], env, ids, args.budget_fractions, args.budget_scales, args.seed)
        serve_s = time.perf_counter() - t0
        metrics = e4.summarize(records)
        curve = e4.curve_points(curve_records, e4.full_quality_by_request(records))
        bar = e4.bar_check(metrics, curve)
        bar["controllers_bar"] = e4.controllers_bar(metrics, curve, args.budget_fractions)
        replay[source] = {"n_requests": len(ids), "controllers": {m: str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                                                                  for m, p in dirs.items()},
                          "flexvlm_training": json.loads((dirs["flexvlm"] / "controller.json").read_text())["metadata"],
                          "fit_s": train_s, "serve_s": serve_s,
                          "oracle": e4.oracle_reference(source, args.budget_fractions), "metrics": metrics, "operating_curve": curve, "bar": bar}
        all_records += [{"source": source, **r} for r in records]
        print(f"{source}: {len(ids)} held-out requests; bar strict={bar['retention_bar_strict']} "
              f"at-equal-violation={bar['retention_bar_at_equal_violation']} p95={bar['p95_bar']}")
        cb = bar["controllers_bar"]
        print(f"  issue [controllers] bar (+{cb['points']:g} over the best single-knob baseline, mean of {len(cb['fractions'])} "
              f"fractions): met={cb['met']}; margins " + ", ".join(
                  f"{name} {c['margin']:+.3f}" if c["margin"] is not None else f"{name} -" for name, c in cb["comparisons"].items()))

    live = {}
    if payload is not None:
        served = payload["requests_served"]
        live_metrics = e4.summarize(payload["records"])
        replay_same = e4.summarize([r for r in all_records if r["source"] == e4.LIVE_SOURCE], served)
        live = {"device": payload["device"].get("device_name", payload["device"].get("device_type", "?")),
                "device_info": payload["device"], "n_requests": len(served), "finished": payload["finished"],
                "full_latency_ms": payload["env"]["full_latency_ms"], "warmup_s": payload["warmup_s"],
                "graph_captures_redone": payload["graph_captures_redone"], "metrics": live_metrics,
                "replay_same_requests": replay_same, "live_minus_replay": e4.compare_live_replay(live_metrics, replay_same),
                "latency_live_over_recorded_same_config": e4.same_config_latency_ratio(payload["records"], e4.LIVE_SOURCE),
                "latency_profile_recheck_over_recorded_same_config": recheck_ratio(args.recheck_table),
                "serving_pattern_probe": (json.loads(Path(args.pattern_file).read_text())
                                          if args.pattern_file is not None and Path(args.pattern_file).is_file() else None),
                # the re-timing's summary figures (its arrays stay in the records file)
                "retiming": {k: v for k, v in (payload.get("retiming") or {}).items() if k not in ("factor", "residual", "config_ratio")},
                "retimed_vs_original": e4.compare_retimed(live_metrics, replay_same),
                "online_margin": payload.get("online_margin"),
                "online_vs_none": e4.compare_online(live_metrics, payload["records"]),
                "bar_strict_only": e4.bar_check(live_metrics, {}, fractions=[f for f in e4.BAR_FRACTIONS
                                                                            if e4.fkey(f) in live_metrics.get("flexvlm", {})])}
        kept = args.out_dir / "e4_live_records.json.gz"  # ~20x smaller than the raw JSON the GPU run writes
        kept.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(kept, "wt") as handle:  # rewritten even over itself: the times are rounded now
            json.dump(payload, handle)

    headline = {}
    for source, entry in replay.items():
        m = entry["metrics"]
        headline[source] = {f: {name: {k: m[name][f][k] for k in ("quality_retention", "violation_rate", "latency_p95_ms",
                                                                  "latency_over_budget_p95")}
                                for name in e4.METHODS} for f in ("0.5", "0.35")}
    summary = {**run_header("e4", args, data_sources={"quality": "micro (recorded, H200 fp32)", "latency": list(args.sources),
                                                      "split": "controllers fit on train half, evaluated on held-out half"}),
               "methods": list(e4.METHODS), "budget_fractions": list(args.budget_fractions), "headline": headline,
               "bars": {s: {k: v for k, v in e["bar"].items()} for s, e in replay.items()},
               "replay": replay, "live": live}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(all_records).to_parquet(args.out_dir / "e4_records_replay.parquet", index=False)
    write_json(args.out_dir / "e4_summary.json", summary)
    figures = e4.plot_from_results(args.out_dir)
    print(f"wrote {args.out_dir / 'e4_summary.json'}, e4_records_replay.parquet and {len(figures)} figures")
    return summary


if __name__ == "__main__":
    main(parse_script_args(Args))
