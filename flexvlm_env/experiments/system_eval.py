"""E4, end-to-end system evaluation: FlexVLM's controller against the baselines at each budget.

Methods: the five baselines of `baselines.knobs` (static full, tokens_only, depth_only,
width_only, greedy tokens -> depth -> width), FlexVLM (a MaskablePPO controller over all three
knobs, importance-ranked blocks, masked by the profiled latency guardrail; trained through
`trainers.ppo` on the latency source's train half, at budgets of 0.35-1.5 x the full latency)
and the LUT as a second learned controller.
Every controller of a latency source is fitted on that source's train half and saved (safetensors
+ JSON, `agents.base.Controller.save`) under `controllers_dir/<source>/<method>`, so the live run
on the GPU loads exactly the controllers the replay evaluation used.

Serving protocol (`serve`), the same for the replay and the live env: per (request, budget
fraction) case the env is reset with both pinned, the controller decides on that one observation
(timed: `decision_ms`), the env executes the decision once, and the latency record, quality and
violation are kept. Replay cases are every held-out request x the five fractions; live cases a
per-family subset of the same held-out requests, served request by request (every method and
fraction of a request before the next request), so a run stopped by its time limit is balanced.
Live, FlexVLM, the LUT and greedy can also be served re-timed on the live host (`add_retimed`,
`agents.retime`); `compare_retimed` sets them against the same methods as trained and against replay.

`summarize` turns records into the metrics per method and fraction: mean quality, retention vs the
full configuration on the same requests, latency mean/P50/P95/P99, SLO violation rate, P95 of
latency/budget (budgets differ per family), per-family P95 vs budget, decision overhead and the
median latency saved vs full. `operating_curve` serves a controller with budget fractions scaled
(0.8x to 6x), scoring violations against the true budget, which gives its retention at other
violation levels: `bar_check` uses it to compare with a baseline "at equal or lower violation rate"
at fractions 0.5 and 0.35 (E4's bar), `controllers_bar` averaged over the five fractions with one
scale for all of them (issue [controllers]' bar: +5 points over the best single-knob baseline).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import Config

from .common import figures_path, pareto_frontier, pyplot, save_figure

SOURCES = ("molmoe-1b-h100", "micro-h200-measured")
LIVE_SOURCE = "micro-h200-measured"
BASELINES = ("full", "tokens_only", "depth_only", "width_only", "greedy")
LEARNED = ("flexvlm", "lut")
METHODS = (*BASELINES, *LEARNED)
RETIMED = ("flexvlm", "lut", "greedy")  # served live a second time, re-timed on the live host (`add_retimed`)
RETIMED_SUFFIX = "+retimed"
ONLINE_SUFFIX = "+online"  # RETIMED's methods, as trained and re-timed, with an online budget margin (`add_online`)
CONTENDERS = ("tokens_only", "depth_only", "width_only", "greedy")  # what the bar compares FlexVLM with
SINGLE_KNOB = ("tokens_only", "depth_only", "width_only")
CONTROLLERS_BAR_POINTS = 0.05  # issue [controllers]: >= the best single-knob baseline's retention + 5 points
BAR_FRACTIONS = (0.5, 0.35)
# FlexVLM's training budgets: the evaluation's five fractions plus two looser than the full
# configuration's latency, so a loose budget is spent on quality rather than extrapolated to.
TRAIN_BUDGET_FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5)
BUDGET_SCALES = (0.8, 0.9, 0.95, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)


def fkey(fraction: float) -> str:
    return f"{float(fraction):g}"


# -- controllers -----------------------------------------------------------------------------------


def train_controllers(source: str, controllers_dir: Path, runs_dir: Path, seed: int = 0,
                      total_env_steps: int = 126_000, reuse: bool = True,
                      budget_fractions: Sequence[float] = TRAIN_BUDGET_FRACTIONS) -> dict[str, Path]:
    """Fit (or, with `reuse`, find) every method's controller for latency `source`; their dirs.

    FlexVLM is `flexvlm-train maskable_ppo` (trainers.ppo, default hyper-parameters, `seed`,
    `total_env_steps`, no W&B, one held-out evaluation at the end); the LUT and the baselines are
    built from the source's train-half profiles."""
    from agents.base import load_controller
    from agents.lut import LUTController
    from agents.profiles import ProfileTables
    from baselines import make_baselines

    out = Path(controllers_dir) / source
    dirs = {m: out / m for m in METHODS}
    if reuse and all((d / "controller.json").exists() for d in dirs.values()):
        for d in dirs.values():
            load_controller(d)  # fail now, not on the GPU, if one is unreadable
        return dirs
    profiles = ProfileTables.load(latency=source, split="train")
    meta = {"latency_source": source, "quality_source": "micro", "split": "train"}
    for name, baseline in make_baselines(profiles).items():
        baseline.save(dirs[name], metadata=meta)
    LUTController.fit(profiles).save(dirs["lut"], metadata=meta)
    from trainers import ppo

    args = ppo.Args(maskable=True, latency=source, seed=seed, total_env_steps=total_env_steps,
                    budget_fractions=tuple(float(f) for f in budget_fractions),
                    eval_every_env_steps=total_env_steps, wandb=False, baselines=False, runs_dir=Path(runs_dir))
    if total_env_steps < args.n_envs * args.n_steps:  # quick runs: one small rollout
        args.n_steps = max(2, total_env_steps // args.n_envs)
        args.batch_size = args.n_envs * args.n_steps
    final = ppo.main(args)
    load_controller(Path(runs_dir) / final["run"] / "controller").save(
        dirs["flexvlm"], metadata={**meta, "trainer": "maskable_ppo", "seed": seed, "env_steps": final["env_steps"],
                                   "train_budget_fractions": list(args.budget_fractions),
                                   "run": final["run"]})
    return dirs


def load_controllers(dirs: dict[str, Path]) -> dict:
    from agents.base import load_controller

    return {name: load_controller(path) for name, path in dirs.items()}


# -- serving ---------------------------------------------------------------------------------------


def heldout_subset(request_ids: Sequence[str], per_family: int | None, seed: int = 0) -> list[str]:
    """`per_family` held-out ids per family (seeded draw, kept in pool order), or all of them."""
    if per_family is None:
        return list(request_ids)
    if per_family < 1:
        raise ValueError(f"per_family={per_family!r} must be >= 1 or None (all held-out requests)")
    rng = np.random.default_rng(seed)
    by_family: dict[str, list[str]] = {}
    for rid in request_ids:
        by_family.setdefault(rid.split("/")[0], []).append(rid)
    chosen = set()
    for family in sorted(by_family):
        ids = by_family[family]
        take = rng.choice(len(ids), size=min(per_family, len(ids)), replace=False)
        chosen.update(ids[i] for i in take)
    return [rid for rid in request_ids if rid in chosen]


def serve_case(controller, env, request_id: str, fraction: float, seed: int, budget_scale: float = 1.0,
               redo_if=None) -> dict:
    """One case: reset pinned (the controller sees `fraction x budget_scale`), timed decision, one
    execution; violation against the true budget (`fraction`). `redo_if(info)` True means the
    execution paid a one-off cost (a CUDA graph capture) and is executed again."""
    options = {"request_id": request_id, "budget_fraction": fraction * budget_scale}
    observation, _ = env.reset(seed=seed, options=options)
    start = time.perf_counter()
    action = controller.select_action(observation)
    decision_ms = (time.perf_counter() - start) * 1e3
    _, _, _, _, info = env.step(action)
    redone = 0
    while redo_if is not None and redo_if(info) and redone < 2:
        env.reset(seed=seed, options=options)
        _, _, _, _, info = env.step(action)
        redone += 1
    budget_ms = float(info["budget_ms"]) / budget_scale
    config = info["config"]
    return {
        "request_id": request_id, "family": info["family"], "fraction": float(fraction), "budget_scale": budget_scale,
        "budget_ms": budget_ms, "latency_ms": float(info["latency_ms"]), "quality": float(info["quality"]),
        "violation": bool(float(info["latency_ms"]) > budget_ms), "crops": config["crops"], "top_k": config["top_k"],
        "active_blocks": config["active_blocks"], "decision_ms": decision_ms,
        "features_ms": float(info.get("controller_overhead_ms", 0.0)), "redone": redone,
        **({"error": info["error"]} if "error" in info else {}),
    }


def serve(controllers: dict, env, request_ids: Sequence[str], fractions: Sequence[float], seed: int = 0,
          time_limit_s: float | None = None, redo_if=None, shuffle: bool = True) -> tuple[list[dict], bool]:
    """Every method x fraction for each request in turn (methods in a seeded order per request).
    Returns (records, finished); with `time_limit_s` it stops after the request in progress. An
    online-margin controller (`agents.online`) is told each outcome after its execution, and its
    record keeps the budget scale it decided with (`online_scale`)."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    records = []
    cases = [(m, f) for m in controllers for f in fractions]
    for i, request_id in enumerate(request_ids):
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            return records, False
        order = rng.permutation(len(cases)) if shuffle else range(len(cases))
        for j in order:
            method, fraction = cases[j]
            controller = controllers[method]
            online = getattr(controller, "kind", None) == "online_margin"
            scale = controller.budget_scale(fraction) if online else None
            record = serve_case(controller, env, request_id, fraction, seed + i, redo_if=redo_if)
            if online:  # the margin learns from each outcome, in serving order
                controller.observe(record["violation"], fraction)
                record["online_scale"] = scale
            records.append({"method": method, **record})
    return records, True


def operating_curve(controller, env, request_ids: Sequence[str], fractions: Sequence[float],
                    scales: Sequence[float] = BUDGET_SCALES, seed: int = 0) -> list[dict]:
    """Records of `controller` told budgets `scale x` the true one (violations against the true one)."""
    records = []
    for scale in scales:
        for f in fractions:
            for i, request_id in enumerate(request_ids):
                records.append(serve_case(controller, env, request_id, f, seed + i, budget_scale=scale))
    return records


# -- metrics ---------------------------------------------------------------------------------------


def oracle_reference(source: str, fractions: Sequence[float], split: str = "heldout") -> dict[str, dict]:
    """Per fraction, what any controller could reach on `source`'s `split` requests with the
    recorded median latencies: `violation_floor` = share of requests whose fastest configuration
    already exceeds the budget; `oracle_retention` = mean over requests of the best quality among
    the configurations within budget (the fastest one's when none is) over the full config's."""
    from ..profiles import load_replay_data
    from ..profiles.replay import request_split_mask

    data = load_replay_data(quality="micro", latency=source)
    rows = request_split_mask(data.request_ids, data.families, split)
    reference = np.array([data.family_full_latency_ms()[f] for f in data.families])[rows]
    latency, quality = data.total_ms[rows], data.quality[rows]
    out = {}
    for f in fractions:
        within = latency <= f * reference[:, None]
        best = np.where(within.any(axis=1), np.where(within, quality, -np.inf).max(axis=1),
                        quality[np.arange(len(quality)), latency.argmin(axis=1)])
        out[fkey(f)] = {"violation_floor": float(1 - within.any(axis=1).mean()),
                        "oracle_retention": float(best.mean() / quality[:, data.full_index].mean()),
                        "fastest_over_full_median": float(np.median(latency.min(axis=1) / reference))}
    return out


def _p(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def full_quality_by_request(records: list[dict]) -> dict[str, float]:
    """Per request, the mean quality of the full method's executions (the retention reference)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        if r["method"] == "full":
            acc.setdefault(r["request_id"], []).append(r["quality"])
    if not acc:
        raise ValueError("records hold no 'full' method executions; retention needs them as the reference")
    return {k: float(np.mean(v)) for k, v in acc.items()}


def metrics(rows: list[dict], full_quality: dict[str, float], full_median_ms: float) -> dict:
    """The E4 metrics of one method at one budget fraction (see the module docstring)."""
    if not rows:
        raise ValueError("no records to summarize")
    latency = np.array([r["latency_ms"] for r in rows])
    budget = np.array([r["budget_ms"] for r in rows])
    quality = np.array([r["quality"] for r in rows])
    reference = np.array([full_quality[r["request_id"]] for r in rows])
    families = sorted({r["family"] for r in rows})
    per_family = {}
    for family in families:
        sel = np.array([r["family"] == family for r in rows])
        per_family[family] = {"p95_latency_ms": _p(latency[sel], 95), "budget_ms": float(np.median(budget[sel])),
                              "p95_within_budget": bool(_p(latency[sel], 95) <= float(np.median(budget[sel]))),
                              "violation_rate": float(np.mean(latency[sel] > budget[sel])), "n": int(sel.sum())}
    decision = np.array([r["decision_ms"] for r in rows])
    features = np.array([r["features_ms"] for r in rows])
    median_ms = float(np.median(latency))
    return {
        "n": len(rows), "quality": float(quality.mean()), "full_quality": float(reference.mean()),
        "quality_retention": float(quality.mean() / reference.mean()) if reference.mean() > 0 else float("nan"),
        "latency_mean_ms": float(latency.mean()), "latency_p50_ms": median_ms, "latency_p95_ms": _p(latency, 95),
        "latency_p99_ms": _p(latency, 99), "violation_rate": float(np.mean(latency > budget)),
        "latency_over_budget_p95": _p(latency / budget, 95), "latency_over_budget_p99": _p(latency / budget, 99),
        "p95_within_budget": bool(_p(latency / budget, 95) <= 1.0),
        "families_p95_within_budget": int(sum(v["p95_within_budget"] for v in per_family.values())),
        "n_families": len(families), "per_family": per_family,
        "budget_ms_median": float(np.median(budget)),
        "decision_ms_median": float(np.median(decision)), "decision_ms_p95": _p(decision, 95),
        "features_ms_median": float(np.median(features)),
        "saved_ms_median": full_median_ms - median_ms,
        "mean_crops": float(np.mean([r["crops"] for r in rows])), "mean_top_k": float(np.mean([r["top_k"] for r in rows])),
        "mean_active_blocks": float(np.mean([r["active_blocks"] for r in rows])),
    }


def summarize(records: list[dict], request_ids: Sequence[str] | None = None) -> dict:
    """{method: {fraction: metrics}} over `records` (restricted to `request_ids` if given)."""
    if request_ids is not None:
        keep = set(request_ids)
        records = [r for r in records if r["request_id"] in keep]
    full_quality = full_quality_by_request(records)
    full_median_ms = float(np.median([r["latency_ms"] for r in records if r["method"] == "full"]))
    out: dict[str, dict] = {}
    methods = list(dict.fromkeys(r["method"] for r in records))
    fractions = sorted({r["fraction"] for r in records})
    for method in methods:
        out[method] = {}
        for f in fractions:
            rows = [r for r in records if r["method"] == method and r["fraction"] == f]
            if rows:
                out[method][fkey(f)] = metrics(rows, full_quality, full_median_ms)
    return out


def curve_points(curve_records: list[dict], full_quality: dict[str, float]) -> dict[str, list[dict]]:
    """Per true fraction, (scale, violation rate, retention, P95) of an operating curve."""
    out: dict[str, list[dict]] = {}
    for f in sorted({r["fraction"] for r in curve_records}):
        for scale in sorted({r["budget_scale"] for r in curve_records}):
            rows = [r for r in curve_records if r["fraction"] == f and r["budget_scale"] == scale]
            if not rows:
                continue
            q = np.mean([r["quality"] for r in rows])
            ref = np.mean([full_quality[r["request_id"]] for r in rows])
            out.setdefault(fkey(f), []).append({
                "budget_scale": scale, "violation_rate": float(np.mean([r["violation"] for r in rows])),
                "quality_retention": float(q / ref) if ref > 0 else float("nan"),
                "latency_p95_ms": _p([r["latency_ms"] for r in rows], 95)})
    return out


def retention_at_violation(points: list[dict], violation_rate: float) -> float | None:
    """The best retention of an operating curve among its points whose violation rate is at most
    `violation_rate` (None when every point violates more)."""
    ok = [p["quality_retention"] for p in points if p["violation_rate"] <= violation_rate + 1e-12]
    return max(ok) if ok else None


def controllers_bar(summary: dict, curve: dict[str, list[dict]], fractions: Sequence[float], method: str = "flexvlm",
                    contenders: Sequence[str] = SINGLE_KNOB, points: float = CONTROLLERS_BAR_POINTS) -> dict:
    """Issue [controllers]' bar, averaged over `fractions`: `method`'s retention at a violation rate
    no higher than each single-knob baseline's, minus that baseline's retention, against `points`.

    Means are over the fractions (retention and violation rate per fraction, then averaged). The
    method's retention "at their violation rate" is the best of its own (if it violates no more)
    and of its operating curve's points, one budget scale for every fraction, whose mean violation
    rate is no higher. The bar is met against the single-knob baseline with the highest retention
    (`best_single_knob`); every contender's margin is reported."""
    keys = [fkey(f) for f in fractions]
    missing = [k for k in keys if k not in curve or k not in summary[method]]
    if missing:
        raise ValueError(f"fractions {missing}: no operating curve or metrics of {method!r} there; "
                         f"the curve has {sorted(curve)}")
    by_scale: dict[float, list[dict]] = {}
    for k in keys:
        for p in curve[k]:
            by_scale.setdefault(p["budget_scale"], []).append(p)
    mean_curve = [{"budget_scale": scale,
                   "violation_rate": float(np.mean([p["violation_rate"] for p in pts])),
                   "quality_retention": float(np.mean([p["quality_retention"] for p in pts]))}
                  for scale, pts in sorted(by_scale.items()) if len(pts) == len(keys)]

    def mean_of(name: str) -> dict:
        return {m: float(np.mean([summary[name][k][m] for k in keys])) for m in ("quality_retention", "violation_rate")}

    ours = mean_of(method)
    rows = {}
    for name in contenders:
        theirs = mean_of(name)
        candidates = [r for r in (ours["quality_retention"] if ours["violation_rate"] <= theirs["violation_rate"] + 1e-12 else None,
                                  retention_at_violation(mean_curve, theirs["violation_rate"])) if r is not None]
        at = max(candidates) if candidates else None
        margin = None if at is None else at - theirs["quality_retention"]
        rows[name] = {"retention": theirs["quality_retention"], "violation_rate": theirs["violation_rate"],
                      f"{method}_retention_at_their_violation": at, "margin": margin,
                      "met": bool(margin is not None and margin >= points - 1e-12)}
    best = max(contenders, key=lambda name: rows[name]["retention"])
    return {"fractions": keys, "points": points, method: ours, "mean_operating_curve": mean_curve,
            "comparisons": rows, "best_single_knob": best, "met": rows[best]["met"]}


def bar_check(summary: dict, curve: dict[str, list[dict]], method: str = "flexvlm",
              fractions: Sequence[float] = BAR_FRACTIONS, contenders: Sequence[str] = CONTENDERS) -> dict:
    """The E4 bar for one source. Per fraction and contender:
    - `strict`: FlexVLM's retention > the contender's and its violation rate <= the contender's;
    - `at_equal_violation`: FlexVLM's operating curve (budget inflated until its violation rate
      reaches the contender's) retains more than the contender at a violation rate no higher;
    the bar holds at a fraction when every contender is beaten by one of the two readings
    (`strict` alone is reported too). P95 <= budget is checked at every fraction >= 0.5."""
    out: dict = {"comparisons": {}, "p95_within_budget": {}}
    holds_equal, holds_strict = True, True
    for f in fractions:
        ours = summary[method][fkey(f)]
        rows = {}
        for name in contenders:
            theirs = summary[name][fkey(f)]
            strict = ours["quality_retention"] > theirs["quality_retention"] and ours["violation_rate"] <= theirs["violation_rate"]
            at_equal = retention_at_violation(curve.get(fkey(f), []), theirs["violation_rate"])
            equal = at_equal is not None and at_equal > theirs["quality_retention"]
            rows[name] = {"retention": theirs["quality_retention"], "violation_rate": theirs["violation_rate"],
                          "flexvlm_retention": ours["quality_retention"], "flexvlm_violation_rate": ours["violation_rate"],
                          "flexvlm_retention_at_their_violation": at_equal, "strict": bool(strict),
                          "at_equal_violation": bool(strict or equal)}
            holds_strict &= bool(strict)
            holds_equal &= bool(strict or equal)
        out["comparisons"][fkey(f)] = rows
    p95_ok = True
    for f, m in summary[method].items():
        if float(f) >= 0.5:
            out["p95_within_budget"][f] = {"latency_over_budget_p95": m["latency_over_budget_p95"],
                                           "families_p95_within_budget": m["families_p95_within_budget"],
                                           "n_families": m["n_families"]}
            p95_ok &= m["p95_within_budget"]
    out["retention_bar_strict"] = bool(holds_strict)
    out["retention_bar_at_equal_violation"] = bool(holds_equal)
    out["p95_bar"] = bool(p95_ok)
    return out


def compare_live_replay(live: dict, replay: dict) -> dict:
    """Per method and fraction: live minus replay violation rate, P95 (ms and of latency/budget)
    and retention, on the same requests."""
    out: dict = {}
    for method, by_f in live.items():
        for f, lm in by_f.items():
            rm = replay.get(method, {}).get(f)
            if rm is None:
                continue
            out.setdefault(method, {})[f] = {
                "violation_rate_live": lm["violation_rate"], "violation_rate_replay": rm["violation_rate"],
                "violation_rate_diff": lm["violation_rate"] - rm["violation_rate"],
                "latency_p95_ms_live": lm["latency_p95_ms"], "latency_p95_ms_replay": rm["latency_p95_ms"],
                "latency_p95_ms_diff": lm["latency_p95_ms"] - rm["latency_p95_ms"],
                "latency_over_budget_p95_live": lm["latency_over_budget_p95"],
                "latency_over_budget_p95_replay": rm["latency_over_budget_p95"],
                "quality_retention_live": lm["quality_retention"], "quality_retention_replay": rm["quality_retention"],
                "quality_retention_diff": lm["quality_retention"] - rm["quality_retention"],
            }
    diffs = [v for m in out.values() for v in m.values()]
    mean_abs = {k: float(np.mean([abs(d[k]) for d in diffs])) for k in
                ("violation_rate_diff", "latency_p95_ms_diff", "quality_retention_diff")} if diffs else {}
    return {"by_method": out, "mean_abs_diff": mean_abs}


def same_config_latency_ratio(live_records: list[dict], source: str = "micro-h200-measured") -> dict:
    """Live latency over the replay table's recorded median for the very same (request, config):
    separates "the device runs slower live than when it was profiled" from "the controller chose
    differently". Summarised overall, per knob value and per method."""
    from ..profiles import load_replay_data

    data = load_replay_data(quality="micro", latency=source)
    row = {rid: i for i, rid in enumerate(data.request_ids)}
    ratios, diffs, keys = [], [], []
    for r in live_records:
        if r["request_id"] not in row:
            continue
        c = data.config_index(Config(crops=r["crops"], top_k=r["top_k"], active_blocks=r["active_blocks"]))
        recorded = float(data.total_ms[row[r["request_id"]], c])
        ratios.append(r["latency_ms"] / recorded)
        diffs.append(r["latency_ms"] - recorded)
        keys.append(r)
    if not ratios:
        return {"n": 0}
    ratios_a, diffs_a = np.asarray(ratios), np.asarray(diffs)

    def by(field: str) -> dict:
        values = sorted({k[field] for k in keys})
        return {str(v): float(np.median([x for x, k in zip(ratios, keys) if k[field] == v])) for v in values}

    return {"n": len(ratios), "source": source, "ratio_median": float(np.median(ratios_a)),
            "ratio_p5": float(np.percentile(ratios_a, 5)), "ratio_p95": float(np.percentile(ratios_a, 95)),
            "diff_ms_median": float(np.median(diffs_a)), "diff_ms_mean": float(diffs_a.mean()),
            "ratio_median_by": {f: by(f) for f in ("method", "crops", "top_k", "active_blocks")}}


def serving_pattern_probe(vlm, samples: Sequence, configs: Sequence[Config], gap_ms: float = 5.0, seed: int = 0) -> dict:
    """The same (request, config) pairs timed end to end under three serving patterns:
    - `config_major`: each configuration back to back over all requests (how the profiler records);
    - `switching`: the pairs in a random order, so the configuration changes almost every request;
    - `switching_with_gap`: the same order with `gap_ms` of host idle time before each request
      (a serving loop computing features, deciding and scoring between requests).
    Every pair runs once untimed first (graphs captured, as in a warm server). Returns per pattern
    the median latency and the median per-pair ratio to `config_major`."""
    if gap_ms < 0:
        raise ValueError(f"gap_ms={gap_ms!r} must be >= 0")
    pairs = [(s, c) for c in configs for s in samples]
    if not pairs:
        raise ValueError("serving_pattern_probe needs at least one sample and one config")

    def run(sample, config) -> float:
        return float(vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens).latency.total_ms)

    for sample, config in pairs:
        run(sample, config)
    order = np.random.default_rng(seed).permutation(len(pairs))
    times: dict[str, np.ndarray] = {"config_major": np.array([run(s, c) for s, c in pairs])}
    switching = np.empty(len(pairs))
    for i in order:
        switching[i] = run(*pairs[i])
    times["switching"] = switching
    gapped = np.empty(len(pairs))
    for i in order:
        time.sleep(gap_ms / 1e3)
        gapped[i] = run(*pairs[i])
    times["switching_with_gap"] = gapped
    base = times["config_major"]
    return {"n_pairs": len(pairs), "gap_ms": gap_ms,
            "patterns": {name: {"median_ms": float(np.median(t)), "ratio_to_config_major_median": float(np.median(t / base))}
                         for name, t in times.items()}}


# -- live ------------------------------------------------------------------------------------------


def add_retimed(controllers: dict, env, per_family: int, repeats: int = 3, seed: int = 0,
                families: Sequence[str] | None = None) -> tuple[dict, dict]:
    """`controllers` plus `RETIMED`'s methods re-timed on `env`'s host (`agents.retime`: factors
    and residuals from `per_family` train-half requests per family, `measure_host_factors`), named
    `<method>+retimed`; and the re-timing report."""
    from agents.profiles import ProfileTables
    from agents.retime import retime_controller
    from flexvlm_env.latency.retime import measure_host_factors

    report = measure_host_factors(env, LIVE_SOURCE, per_family, repeats, seed, families)
    profiles = ProfileTables.load(latency=LIVE_SOURCE, split="train")
    retimed = {m + RETIMED_SUFFIX: retime_controller(controllers[m], report["factor"], profiles, report["residual"])
               for m in RETIMED}
    return {**controllers, **retimed}, report


def compare_retimed(live: dict, replay: dict) -> dict:
    """Per re-timed method and fraction: violation rate and retention live as trained, live
    re-timed, and in replay (same requests)."""
    out: dict = {}
    for method in RETIMED:
        for f, lm in live.get(method + RETIMED_SUFFIX, {}).items():
            original = live.get(method, {}).get(f)
            rm = replay.get(method, {}).get(f)
            if original is None or rm is None:
                continue
            out.setdefault(method, {})[f] = {
                "violation_rate_live": original["violation_rate"], "violation_rate_live_retimed": lm["violation_rate"],
                "violation_rate_replay": rm["violation_rate"],
                "quality_retention_live": original["quality_retention"],
                "quality_retention_live_retimed": lm["quality_retention"], "quality_retention_replay": rm["quality_retention"],
                "latency_over_budget_p95_live": original["latency_over_budget_p95"],
                "latency_over_budget_p95_live_retimed": lm["latency_over_budget_p95"],
            }
    cells = [v for m in out.values() for v in m.values()]
    mean_abs = {name: float(np.mean([abs(c[f"violation_rate_{name}"] - c["violation_rate_replay"]) for c in cells]))
                for name in ("live", "live_retimed")} if cells else {}
    return {"by_method": out, "mean_abs_violation_diff_from_replay": mean_abs}


def add_online(controllers: dict, margin=None) -> dict:
    """`controllers` plus `<method>+online` for `RETIMED`'s methods and their re-timed copies: each
    wrapped in its own online budget margin (`agents.online.OnlineMarginController`, `margin`:
    an `OnlineMargin`, default settings if None), which `serve` updates after every outcome."""
    from agents.online import OnlineMarginController

    bases = [m for m in controllers if m.removesuffix(RETIMED_SUFFIX) in RETIMED]
    return {**controllers, **{m + ONLINE_SUFFIX: OnlineMarginController(controllers[m], margin) for m in bases}}


def compare_online(live: dict, records: list[dict], quarters: int = 4) -> dict:
    """Per method served with and without an online margin: per fraction, violation rate and
    retention of both and the margin's last budget scale; and both violation rates per fraction
    over the run's successive quarters of requests (how each follows a host whose speed moves)."""
    order = list(dict.fromkeys(r["request_id"] for r in records))
    quarter = {rid: min(quarters - 1, i * quarters // max(1, len(order))) for i, rid in enumerate(order)}
    by_case: dict[tuple[str, str], list[dict]] = {}  # (method, fraction) -> its records in serving order, one pass
    for r in records:
        by_case.setdefault((r["method"], fkey(r["fraction"])), []).append(r)
    out: dict = {}
    for method in live:
        if not method.endswith(ONLINE_SUFFIX) or method.removesuffix(ONLINE_SUFFIX) not in live:
            continue
        base = method.removesuffix(ONLINE_SUFFIX)
        entry: dict = {"by_fraction": {}, "violation_rate_by_quarter": {}}
        for f, om in live[method].items():
            pm = live[base].get(f)
            if pm is None:
                continue
            scales = [r["online_scale"] for r in by_case.get((method, f), [])]
            entry["by_fraction"][f] = {
                "violation_rate": pm["violation_rate"], "violation_rate_online": om["violation_rate"],
                "quality_retention": pm["quality_retention"], "quality_retention_online": om["quality_retention"],
                "last_budget_scale": scales[-1] if scales else None}
        for name in (base, method):
            by_quarter = entry["violation_rate_by_quarter"][name] = {}
            for f in live[method]:
                cells = [[] for _ in range(quarters)]
                for r in by_case.get((name, f), []):
                    cells[quarter[r["request_id"]]].append(r["violation"])
                by_quarter[f] = [float(np.mean(c)) if c else None for c in cells]
        out[base] = entry
    return out


def compact_live_records(payload: dict, decimals: int = 4) -> dict:
    """A live run's payload with every record's times (`*_ms`) rounded to `decimals` places of a
    millisecond (100 ns by default, far below the run-to-run noise of these timings): full-precision
    float timings barely compress, and the kept copy's gzip is about half the size. Nothing else
    changes."""
    def rounded(record: dict) -> dict:
        return {k: round(v, decimals) if k.endswith("_ms") and isinstance(v, float) else v for k, v in record.items()}

    return {**payload, "records": [rounded(r) for r in payload["records"]]}


def make_live_env(device: str, per_family_pool: int, calibration_requests: int, dtype: str | None = None):
    """`FlexVLM-v0` (micro) serving the recorded pool's val requests (the same request ids as the
    replay tables: procedural val, task seed 0), budgets from its own calibration on this device.

    Built twice on one model: the first env's warm-up and calibration run every configuration and
    the calibration requests once (on CUDA capturing their graphs, whose first use is slow), so
    the second env, sharing the model, calibrates the full-configuration latency warm."""
    import gymnasium as gym

    import flexvlm_env  # noqa: F401

    common = {"split": "val", "task_seed": 0, "requests_per_family": per_family_pool, "episode_length": 1,
              "calibration_requests": calibration_requests}
    cold = gym.make("FlexVLM-v0", device=device, dtype=dtype, **common)
    env = gym.make("FlexVLM-v0", vlm=cold.unwrapped.vlm, warmup="none", **common)
    env.unwrapped.warmup_s = cold.unwrapped.warmup_s  # what the shared model's warm-up cost
    env.unwrapped.calibration["cold_full_latency_ms"] = dict(cold.unwrapped.full_latency_ms)
    return env


def graph_capture_detector(env):
    """`redo_if` for `serve`: True when the last step captured a CUDA graph (a one-off cost a warm
    server never pays: the env's warm-up captures one prefill length bucket per configuration)."""
    graphs = getattr(env.unwrapped.vlm, "_graphs", None)
    if graphs is None:
        return None
    state = {"n": len(graphs.graphs)}

    def redo(info) -> bool:
        n = len(graphs.graphs)
        captured = n != state["n"]
        state["n"] = n
        return captured

    return redo


# -- figures ---------------------------------------------------------------------------------------

COLORS = {"full": "k", "tokens_only": "tab:blue", "depth_only": "tab:orange", "width_only": "tab:green",
          "greedy": "tab:purple", "flexvlm": "tab:red", "lut": "tab:brown"}


def _style(method: str) -> dict:
    """Colour of a method; live only, in its method's colour: re-timed (`<method>+retimed`) dashed,
    with an online margin (`+online`) dotted, both dash-dotted."""
    online = method.endswith(ONLINE_SUFFIX)
    retimed = method.removesuffix(ONLINE_SUFFIX).endswith(RETIMED_SUFFIX)
    base = method.removesuffix(ONLINE_SUFFIX).removesuffix(RETIMED_SUFFIX)
    ls = {(True, False): "--", (False, True): ":", (True, True): "-."}.get((retimed, online))
    return {"color": COLORS.get(base), **({"ls": ls} if ls else {})}


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Rebuild E4's figures from `results/e4_summary.json` alone."""
    results_dir = Path(results_dir)
    summary = json.loads((results_dir / "e4_summary.json").read_text())
    figures = figures_path(results_dir, figures_dir)
    written = []
    panels = [(s, summary["replay"][s]["metrics"], summary["replay"][s].get("oracle")) for s in summary["replay"]]
    if summary.get("live", {}).get("metrics"):
        # in METHODS' order, each followed by its online, re-timed and re-timed online copies (the
        # records' order is the serving order, shuffled per request)
        variants = ("", ONLINE_SUFFIX, RETIMED_SUFFIX, RETIMED_SUFFIX + ONLINE_SUFFIX)
        rank = {m + v: i for i, (m, v) in enumerate((m, v) for m in METHODS for v in variants)}
        live = dict(sorted(summary["live"]["metrics"].items(), key=lambda item: rank.get(item[0], len(rank))))
        retimed = any(m.endswith(RETIMED_SUFFIX) for m in live)
        online = any(m.endswith(ONLINE_SUFFIX) for m in live)
        note = ", ".join(n for n, shown in (("dashed: re-timed on this host", retimed), ("dotted: online margin", online)) if shown)
        panels.append(("live " + summary["live"]["device"] + (f" ({note})" if note else ""), live, None))

    def grid_plot(name, title, draw):
        plt = pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
        for ax, (label, data, oracle) in zip(axes[0], panels):
            draw(ax, data)
            if oracle and name == "e4_violation_vs_budget.png":
                ax.plot([float(f) for f in oracle], [o["violation_floor"] for o in oracle.values()], color="grey",
                        ls=":", lw=2, label="floor: fastest config over budget")
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
            if any(m.endswith((RETIMED_SUFFIX, ONLINE_SUFFIX)) for m in data):  # methods the first panel's legend lacks
                ax.legend(fontsize=6)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, figures / name, 120))

    def frontier(ax, data):
        for method, by_f in data.items():
            p95 = [m["latency_p95_ms"] for m in by_f.values()]
            ret = [m["quality_retention"] for m in by_f.values()]
            style = _style(method)
            ax.scatter(p95, ret, color=style["color"], s=18, marker="^" if "ls" in style else "o", label=method)
            idx = pareto_frontier(p95, ret)
            ax.plot(np.asarray(p95)[idx], np.asarray(ret)[idx], lw=1, **style)
        ax.set_xlabel("P95 latency (ms)")
        ax.set_ylabel("quality retention vs full")

    def versus_budget(key, ylabel, hline=None):
        def draw(ax, data):
            for method, by_f in data.items():
                fr = [float(f) for f in by_f]
                ax.plot(fr, [m[key] for m in by_f.values()], marker="o", ms=3, label=method, **_style(method))
            if hline is not None:
                ax.axhline(hline, color="k", lw=0.8, ls="--")
            ax.set_xlabel("budget fraction of full latency")
            ax.set_ylabel(ylabel)
        return draw

    grid_plot("e4_frontiers.png", "E4: P95 latency vs quality retention (one point per budget fraction)", frontier)
    grid_plot("e4_p95_vs_budget.png", "E4: P95 of latency / budget (solid) per budget fraction; 1 = at the budget",
              versus_budget("latency_over_budget_p95", "P95 latency / budget", 1.0))
    grid_plot("e4_p99_vs_budget.png", "E4: P99 of latency / budget per budget fraction",
              versus_budget("latency_over_budget_p99", "P99 latency / budget", 1.0))
    grid_plot("e4_violation_vs_budget.png", "E4: SLO violation rate (latency > budget)",
              versus_budget("violation_rate", "violation rate"))
    grid_plot("e4_retention_vs_budget.png", "E4: quality retention vs the full configuration",
              versus_budget("quality_retention", "quality retention"))

    def overhead(ax, data):
        for method, by_f in data.items():
            saved = [m["saved_ms_median"] for m in by_f.values()]
            cost = [m["decision_ms_median"] + m["features_ms_median"] for m in by_f.values()]
            style = _style(method)
            ax.scatter(saved, cost, color=style["color"], s=18, marker="^" if "ls" in style else "o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("median latency saved vs full (ms)")
        ax.set_ylabel("decision (+ features, live) ms, median")

    grid_plot("e4_overhead_vs_savings.png", "E4: controller overhead vs latency saved", overhead)

    online = summary.get("live", {}).get("online_vs_none") or {}
    if online:
        fractions = [f for f in ("0.7", "0.85", "1") if any(f in e["violation_rate_by_quarter"][b] for b, e in online.items())]
        plt = pyplot()
        fig, axes = plt.subplots(1, len(fractions), figsize=(4.6 * len(fractions), 3.6), squeeze=False)
        for ax, f in zip(axes[0], fractions):
            for base in RETIMED:  # as trained, solid, and with the margin, dotted
                entry = online.get(base)
                if entry is None or f not in entry["violation_rate_by_quarter"][base]:
                    continue
                for name in (base, base + ONLINE_SUFFIX):
                    rates = [np.nan if r is None else r for r in entry["violation_rate_by_quarter"][name][f]]
                    ax.plot(range(1, len(rates) + 1), rates, marker="o", ms=3, label=name, **_style(name))
                    ax.set_xticks(range(1, len(rates) + 1))
            target = summary["live"].get("online_margin") or {}
            if target.get("target_violation_rate"):
                ax.axhline(target["target_violation_rate"], color="k", lw=0.8, ls="--", label="target")
            ax.set_xlabel("quarter of the live run (requests in serving order)")
            ax.set_ylabel("violation rate")
            ax.set_title(f"budget fraction {f}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"E4 live ({summary['live']['device']}): violations over the run, as trained (solid) and "
                     "with an online budget margin (dotted)", fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, figures / "e4_online_margin.png", 120))

    curves = {s: v.get("operating_curve") for s, v in summary["replay"].items() if v.get("operating_curve")}
    if curves:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4), squeeze=False)
        for ax, (source, curve) in zip(axes[0], curves.items()):
            metrics_ = summary["replay"][source]["metrics"]
            for i, f in enumerate(BAR_FRACTIONS):
                pts = curve.get(fkey(f), [])
                c = f"C{i}"
                ax.plot([p["violation_rate"] for p in pts], [p["quality_retention"] for p in pts], marker="o", ms=3,
                        color=c, label=f"FlexVLM, budget told x scale, fraction {f:g}")
                for name in CONTENDERS:
                    m = metrics_[name][fkey(f)]
                    ax.scatter(m["violation_rate"], m["quality_retention"], color=c, marker="x")
                    ax.annotate(name, (m["violation_rate"], m["quality_retention"]), fontsize=6, color=c)
            ax.set_xlabel("violation rate (true budget)")
            ax.set_ylabel("quality retention")
            ax.set_title(source, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle("E4: FlexVLM's violation/retention curve vs the baselines (x) at fractions 0.5 and 0.35", fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, figures / "e4_equal_violation.png", 120))
    return written
