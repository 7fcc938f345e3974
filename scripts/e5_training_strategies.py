"""E5: LUT, supervised, PPO, MaskablePPO, DPO, GRPO and DPO-then-GRPO on the same env, budgets and env-step budget.

    python scripts/e5_training_strategies.py [--seeds 0 1 2] [--total-env-steps 126000] [--methods ...] [--merge]

Every (method, seed) is one `flexvlm-train METHOD --seed S --total-env-steps N --no-baselines`
run on `FlexVLMReplay-v0` (train half of the recorded requests to learn on, held-out half to
evaluate on); a pipeline (`dpo_grpo`) is one such run per stage, each started from the one before
(`--init-from`), their env steps adding up to N. A finished run trained with the same arguments (its
`args.json`; an argument added to the trainer after the run counts at its default) is reused, so the script
resumes where it stopped, and a run trained with other `--extra` flags or defaults is not.
The baselines are evaluated once per seed on the same held-out requests. `--merge` reruns only the
listed methods: their entries and curves replace those in the existing summary (each marked with its
date and machine, and listed under `updates`); the other methods and the baselines are kept as they are.

Outputs (committed):
- `results/e5_summary.json`: per method and baseline `{method, seeds, env_steps_to_threshold,
  final: {"<budget fraction>": {quality_retention, violation_rate, p95_latency_ms}},
  decision_overhead_ms, ...}` (means over seeds; the per-seed values and spreads alongside);
- `results/e5_curves.json.gz`: every run's held-out curve;
- `results/figures/e5_learning_curves.png` (mean over seeds, min-max band) and
  `results/figures/e5_frontiers.png` (P95 latency vs quality retention per budget fraction); what E5 computes from
  the runs, and these figures, are in `flexvlm_env.experiments.training_strategies`
  (`python scripts/make_figures.py --only e5` redraws them from the two JSON files).

The threshold is E5's: violation rate <= 5% and quality >= 90% of the full configuration's
(retention >= 0.9), both averaged over the five budget fractions, on the held-out requests.
"""
from __future__ import annotations

import functools
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tyro

from flexvlm_env.experiments.common import machine as common_machine
from flexvlm_env.experiments.common import read_json, run_header, versions, write_json
from flexvlm_env.experiments.training_strategies import THRESHOLD, final_table, mean_tables, plot, steps_to_threshold

# dpo_grpo: a pipeline, not a trainer. DPO for the first fifth of the env steps, then GRPO started from its
# controller (`--init-from`) for the rest, at a quarter of GRPO's default learning rate: a policy that already
# reads the budget is fine-tuned, not learned from scratch (session 30's device runs: 0.616 mean held-out reward
# at seeds 0-4, against 0.607 at the default rate at seeds 0-2 and 0.594 for GRPO alone at seeds 0-4;
# results/device/session30/INDEX.md).
PIPELINES = {"dpo_grpo": (("dpo", 0.2, ()), ("grpo", 0.8, ("--learning-rate", "2.5e-4")))}
METHODS = ("lut", "supervised", "ppo", "maskable_ppo", "dpo", "grpo", *PIPELINES)


@dataclass
class Args:
    methods: tuple[str, ...] = METHODS
    """methods to run (`flexvlm-train` names, and dpo_grpo: DPO for a fifth of the env steps, then GRPO from it)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds per method"""
    total_env_steps: int = 126_000
    """env steps every method gets (profiled executions count for LUT and supervised)"""
    eval_every_env_steps: int = 12_600
    """held-out evaluation interval"""
    runs_dir: Path = Path("runs/e5")
    """where the runs go (reused when rerun)"""
    out: Path = Path("results/e5_summary.json")
    """summary JSON; curves and figures go beside it"""
    extra: str = ""
    """extra `flexvlm-train` arguments for every run, one string split as a shell would; it starts with `--`,
    so give it with `=`: `--extra="--num-iterations 8 --learning-rate 5e-4"` (not with a pipeline: its stages
    are different trainers)"""
    merge: bool = False
    """replace only these methods' entries and curves in the existing --out summary (baselines kept)"""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ValueError(f"--methods={self.methods}: give one or more of {METHODS} (unknown: {unknown})")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"--seeds={self.seeds}: give one or more seeds >= 0")
        for name in ("total_env_steps", "eval_every_env_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.merge and not self.out.exists():
            raise ValueError(f"--merge: --out={str(self.out)!r} does not exist; run without --merge first")
        if self.extra and any(m in PIPELINES for m in self.methods):
            raise ValueError(f"--extra={self.extra!r} cannot go with --methods {' '.join(self.methods)}: a pipeline's "
                             "stages are different trainers; run the pipeline without --extra")
        try:
            shlex.split(self.extra)
        except ValueError as error:
            raise ValueError(f"--extra={self.extra!r} does not split into arguments ({error})") from None


# args.json keys that change neither what a run learns nor how it is evaluated
UNCOMPARED = ("runs_dir", "resume", "wandb", "wandb_project", "baselines")


def train_argv(args: Args, seed: int, env_steps: int | None = None, extra: list[str] | None = None) -> list[str]:
    """`flexvlm-train METHOD` arguments of one E5 run (the same for every method; a pipeline stage gives its own
    env steps and extra arguments)."""
    return ["--seed", str(seed), "--total-env-steps", str(env_steps or args.total_env_steps), "--eval-every-env-steps",
            str(args.eval_every_env_steps), "--no-wandb", "--no-baselines", "--runs-dir", str(args.runs_dir),
            *(shlex.split(args.extra) if extra is None else extra)]


def wanted_args(args: Args, method: str, seed: int, env_steps: int | None = None, extra: list[str] | None = None) -> dict:
    """The `args.json` an E5 run of (method, seed) writes, less UNCOMPARED: a run is reused only if it matches."""
    from trainers.cli import parse_args
    from trainers.common import args_record

    parsed = parse_args(method, train_argv(args, seed, env_steps, extra))
    parsed.absolutize_paths()  # as the trainer's validate() does before it writes args.json
    record = args_record(method, parsed)
    return {k: v for k, v in record.items() if k not in UNCOMPARED}


def matches(run: Path, wanted: dict, method: str) -> bool:
    """Whether `run` was trained with the `wanted` arguments. An argument its `args.json` lacks was added to the
    trainer after the run, which then ran as that argument's default does (e.g. `--init-from` None, a fresh model):
    it matches the default only."""
    from trainers.common import absolute_paths

    try:
        record = json.loads((run / "args.json").read_text())
    except (OSError, ValueError):
        return False
    record = absolute_paths({**{k: v for k, v in default_args(method).items() if k not in record}, **record})
    return {k: v for k, v in record.items() if k not in UNCOMPARED} == wanted


@functools.lru_cache(maxsize=None)
def default_args(method: str) -> dict:
    """The `args.json` record of `flexvlm-train METHOD` with every argument at its default (cached: read only)."""
    from trainers.cli import parse_args
    from trainers.common import args_record

    return args_record(method, parse_args(method, []))


def find_run(runs_dir: Path, method: str, seed: int, wanted: dict) -> Path | None:
    """The newest finished run of (method, seed) trained with the wanted arguments, if any."""
    finished = sorted(p.parent for p in runs_dir.glob(f"FlexVLMReplay-v0__{method}__{seed}__*/final.json"))
    finished = [p for p in finished if matches(p, wanted, method)]
    return finished[-1] if finished else None


def unfinished_run(runs_dir: Path, method: str, seed: int, wanted: dict) -> Path | None:
    started = sorted(p for p in runs_dir.glob(f"FlexVLMReplay-v0__{method}__{seed}__*")
                     if (p / "checkpoint").exists() and matches(p, wanted, method))
    return started[-1] if started else None


def run_method(args: Args, method: str, seed: int, env_steps: int | None = None, extra: list[str] | None = None) -> Path:
    wanted = wanted_args(args, method, seed, env_steps, extra)
    done = find_run(args.runs_dir, method, seed, wanted)
    if done is not None:
        return done
    command = [sys.executable, "-m", "trainers.cli", method, *train_argv(args, seed, env_steps, extra)]
    partial = unfinished_run(args.runs_dir, method, seed, wanted)
    if partial is not None:
        command += ["--resume", str(partial)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    found = find_run(args.runs_dir, method, seed, wanted)
    if found is None:
        raise RuntimeError(f"{method} seed {seed} finished without a final.json in {args.runs_dir}")
    return found


def pipeline_stages(args: Args, name: str) -> list[tuple[str, int, list[str]]]:
    """(trainer, env steps, extra arguments) of each stage of pipeline `name`; the stages' env steps add up to
    --total-env-steps (the last stage takes what the others leave)."""
    stages, left = [], args.total_env_steps
    for i, (method, share, extra) in enumerate(PIPELINES[name]):
        steps = left if i == len(PIPELINES[name]) - 1 else round(args.total_env_steps * share)
        if steps < 1:
            raise ValueError(f"--total-env-steps={args.total_env_steps} leaves stage {i + 1} of {name} ({method}) no env step")
        stages.append((method, steps, list(extra)))
        left -= steps
    return stages


class SeedRun(NamedTuple):
    """What E5 reads of one (method, seed): the final held-out evaluation (its last run's), the held-out curve
    over all its runs, their env steps, wall-clock and run names, and the decision overhead."""
    result: dict
    curve: list[dict]
    env_steps: int
    wall_clock_s: float
    overhead_ms: float
    runs: list[str]


def seed_run(args: Args, method: str, seed: int) -> SeedRun:
    """Run (or reuse) one seed of `method`. A pipeline's stages run in turn, each started from the controller the
    one before it saved; their curves are joined on one env-step axis (a later stage's first evaluation, of the
    weights it starts from, is the earlier stage's last, so it is left out)."""
    from trainers.common import read_curves

    stages = pipeline_stages(args, method) if method in PIPELINES else [(method, None, None)]
    curve, env_steps, wall_clock_s, runs, previous = [], 0, 0.0, [], None
    for trainer, steps, extra in stages:
        if previous is not None:
            extra = [*extra, "--init-from", str(previous / "controller")]
        run_dir = run_method(args, trainer, seed, steps, extra)
        final = json.loads((run_dir / "final.json").read_text())
        lines = read_curves(run_dir)
        curve += [{**line, "env_steps": line["env_steps"] + env_steps, "wall_clock_s": line.get("wall_clock_s", 0.0) + wall_clock_s}
                  for line in (lines if previous is None else lines[1:])]
        env_steps += final["env_steps"]
        wall_clock_s += final["wall_clock_s"]
        runs.append(final["run"])
        previous = run_dir
    return SeedRun(final["results"][trainer], curve, env_steps, wall_clock_s,
                   final["decision_overhead_ms"][trainer]["median_ms"], runs)


def evaluate_baselines(seeds) -> dict[str, list[dict]]:
    import gymnasium as gym

    import flexvlm_env  # noqa: F401
    from agents.evaluation import decision_overhead_ms, evaluate
    from agents.profiles import ProfileTables
    from baselines import make_baselines

    env = gym.make("FlexVLMReplay-v0", split="heldout", episode_length=1)
    out: dict[str, list[dict]] = {}
    for name, baseline in make_baselines(ProfileTables.load(split="train")).items():
        for seed in seeds:
            result = evaluate(baseline, env, seed=seed)
            result["decision_overhead_ms"] = decision_overhead_ms(baseline, env, seed=seed)
            out.setdefault(name, []).append(result)
    return out


def machine() -> dict:
    """The CPU (model name, from `flexvlm_env.experiments.common.machine`), Python, torch and its thread count."""
    import torch

    return {**common_machine(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def method_entry(args: Args, method: str) -> tuple[dict, list[list[dict]]]:
    """Run (or reuse) every seed of `method`; its summary entry and its held-out curves."""
    seeds = [seed_run(args, method, seed) for seed in args.seeds]
    results = [s.result for s in seeds]
    thresholds = [steps_to_threshold(s.curve) for s in seeds]
    rewards = [r["mean"]["reward"] for r in results]
    entry = {
        "method": method, "kind": "method", "seeds": list(args.seeds), "extra_args": shlex.split(args.extra),
        "env_steps_to_threshold": (None if any(t is None for t in thresholds) else float(np.mean(thresholds))),
        "env_steps_to_threshold_per_seed": thresholds,
        "final": mean_tables([final_table(r) for r in results]),
        "final_mean": {k: float(np.mean([r["mean"][k] for r in results])) for k in results[0]["mean"]},
        "final_reward_std_over_seeds": float(np.std(rewards)),
        "decision_overhead_ms": float(np.mean([s.overhead_ms for s in seeds])),
        "train_wall_clock_s": float(np.mean([s.wall_clock_s for s in seeds])),
        "env_steps": int(np.mean([s.env_steps for s in seeds])),
        "runs": [run for s in seeds for run in s.runs],
    }
    if method in PIPELINES:
        entry["stages"] = [{"method": m, "env_steps": n, "extra_args": extra} for m, n, extra in pipeline_stages(args, method)]
    return entry, [s.curve for s in seeds]


def baseline_entries(seeds) -> list[dict]:
    return [{
        "method": name, "kind": "baseline", "seeds": list(seeds), "env_steps_to_threshold": None,
        "final": mean_tables([final_table(r) for r in results]),
        "final_mean": {k: float(np.mean([r["mean"][k] for r in results])) for k in results[0]["mean"]},
        "final_reward_std_over_seeds": float(np.std([r["mean"]["reward"] for r in results])),
        "decision_overhead_ms": float(np.mean([r["decision_overhead_ms"]["median_ms"] for r in results])),
    } for name, results in evaluate_baselines(seeds).items()]


def summary_header(args: Args, host: dict, today: str, previous: dict | None = None) -> dict:
    """The summary's fields but its entries. A new summary starts with `run_header`'s (versions and arguments, as
    every experiment's does) and what E5 ran on; with --merge, `previous`'s are kept and this update, with its own
    versions and arguments, replaces any earlier update of only these methods in `updates`."""
    if previous is None:
        return {**run_header("E5", args, env="FlexVLMReplay-v0", quality_source="micro", latency_source="molmoe-1b-h100",
                             eval="held-out half of the recorded val pool (900 requests) x budget fractions "
                                  "0.35/0.5/0.7/0.85/1.0",
                             total_env_steps=args.total_env_steps, threshold=THRESHOLD),
                "machine": host, "date": today}  # the machine with E5's torch threads
    header = {k: v for k, v in previous.items() if k != "entries"}
    update = {"methods": list(args.methods), "date": today, "machine": host, "versions": versions(),
              "args": run_header("E5", args)["args"]}
    header["updates"] = [*(u for u in header.get("updates", []) if not set(u["methods"]) <= set(args.methods)), update]
    return header


def main(args: Args) -> None:
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    curves_path = args.out.parent / "e5_curves.json.gz"
    today, host = time.strftime("%Y-%m-%d"), machine()
    if args.merge:  # checked before any training: every method gets the same env-step budget
        previous = json.loads(args.out.read_text())
        if previous["total_env_steps"] != args.total_env_steps:
            raise ValueError(f"--merge: --total-env-steps={args.total_env_steps} differs from the summary's "
                             f"{previous['total_env_steps']}; every method gets the same env-step budget")
    fresh = {}
    curves: dict[str, list[list[dict]]] = {}
    for method in args.methods:
        fresh[method], curves[method] = method_entry(args, method)
    header = summary_header(args, host, today, previous if args.merge else None)
    if args.merge:
        for entry in fresh.values():
            entry.update(date=today, machine=host)
        summary = [fresh.pop(e["method"], e) for e in previous["entries"]] + list(fresh.values())
        curves = {**read_json(curves_path), **curves}
    else:
        summary = list(fresh.values()) + baseline_entries(args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**header, "entries": summary}, indent=1))
    write_json(curves_path, curves)
    figures = args.out.parent / "figures"
    plot(curves, summary, figures)
    print(f"{'method':14s} {'retain':>7s} {'viol':>6s} {'p95 ms':>7s} {'reward':>7s} {'steps→thr':>10s} {'overhead ms':>11s}")
    for e in summary:
        m = e["final_mean"]
        print(f"{e['method']:14s} {m['quality_retention']:7.3f} {m['violation_rate']:6.3f} {m['latency_p95_ms']:7.2f} "
              f"{m['reward']:7.3f} {str(e['env_steps_to_threshold']):>10s} {e['decision_overhead_ms']:11.4f}")
    print(f"wrote {args.out}, {curves_path}, {figures}/e5_*.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
