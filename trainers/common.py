"""What every `flexvlm-train` method shares: arguments, environments, the run directory, logging.

A run lives in `{runs_dir}/{env}__{method}__{seed}__{unix time}` (CleanRL's layout) and holds
`args.json`, `curves.jsonl` (one line per evaluation: env steps, wall-clock, the held-out metrics
under `eval/` and the method's training metrics under `train/`), `checkpoint/` (the method's
resumable state: safetensors + JSON), `controller/` (the final controller, `agents.load_controller`
reads it), `final.json` (the trained controller and the baselines on the held-out requests) and
`learning_curves.png`. (GRPO's `checkpoint/` is a Hugging Face Trainer checkpoint: safetensors weights, and optimizer,
scheduler and RNG states in torch files that the Trainer loads back with `weights_only=True`.) W&B gets the same records (offline unless `WANDB_API_KEY` or `WANDB_MODE`
says otherwise; `--no-wandb` turns it off), so curves compare with and without W&B; it gets each once a checkpoint
covers it (`flexvlm_env.training.tracking`), so an interrupted and resumed run sends every step once.

Resume: `--resume RUN_DIR` continues a run from its last checkpoint with the arguments in its `args.json`
(`flexvlm-train METHOD --resume RUN_DIR` needs no other flag; a flag given with it may change only what
`RESUME_MAY_CHANGE` lists, since a seed, table or step budget changed halfway would make a run that is
neither the old one nor a new one). Curve lines logged after that checkpoint are dropped first (they
are logged again), so nothing is lost or duplicated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import flexvlm_env  # noqa: F401  (registers the env ids)
from agents.base import Controller
from agents.evaluation import decision_overhead_ms, evaluate, format_comparison
from agents.guardrail import LatencyGuardrail
from agents.profiles import ProfileTables
from flexvlm_env.envs.core import DEFAULT_BUDGET_FRACTIONS
from flexvlm_env.profiles.loading import SHIPPED, check_source
from flexvlm_env.training.state import recover_directory
from flexvlm_env.training.tracking import WandbLog

ENV_IDS = ("FlexVLMReplay-v0", "FlexVLM-v0")
CURVES_FILE = "curves.jsonl"
CHECKPOINT_DIR = "checkpoint"
# The table arguments and the kind of table each takes (`flexvlm_env.profiles.loading.check_source`)
TABLE_ARGS = {"latency": "latency", "quality": "quality", "requests_table": "requests"}
# The other file arguments (LMArgs has init_from)
FILE_ARGS = ("guardrail_estimator", "init_from")
# What a resumed run may change: where it logs and whether it ends with the baselines, nothing that shapes training.
RESUME_MAY_CHANGE = frozenset({"resume", "runs_dir", "wandb", "wandb_project", "baselines"})


def check_number(name: str, value: float, *, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None) -> None:
    """A ValueError naming flag `--name` unless `value` is a finite number within the bounds given. (NaN fails every
    comparison, so a check written as `value < 0: raise` alone lets it through, and inf passes `value > 0`.)"""
    bounds = [f">= {at_least}" if at_least is not None else "", f"> {above}" if above is not None else "",
              f"<= {at_most}" if at_most is not None else ""]
    ok = (isinstance(value, (int, float)) and math.isfinite(value) and (at_least is None or value >= at_least)
          and (above is None or value > above) and (at_most is None or value <= at_most))
    if not ok:
        rule = f"in [{at_least}, {at_most}]" if None not in (at_least, at_most) else " and ".join(b for b in bounds if b)
        raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a finite number" + (f" {rule}" if rule else ""))


@dataclass
class CommonArgs:
    """Arguments every method takes (each method's Args dataclass adds its own)."""

    env: str = "FlexVLMReplay-v0"
    """environment id: FlexVLMReplay-v0 (recorded tables, fast) or FlexVLM-v0 (the model runs here)"""
    seed: int = 0
    """seed of the method, the env and the evaluation subset"""
    total_env_steps: int = 100_000
    """env steps (executions of a request at a configuration, profiled ones included) to train for"""
    eval_every_env_steps: int = 20_000
    """evaluate on the held-out requests every this many env steps"""
    eval_requests: int | None = None
    """held-out requests per evaluation (None: all of them; the live env defaults to 18)"""
    budget_fractions: tuple[float, ...] = DEFAULT_BUDGET_FRACTIONS
    """budget fractions of the full-configuration latency, for training and evaluation"""
    lam: float = 1.0
    """reward penalty weight of the relative budget overshoot"""
    quality: str = "micro"
    """recorded quality table (replay env and profiles): micro (shipped), or the path of a `flexvlm-profile quality`
    table (your checkpoint or adapter)"""
    latency: str = "molmoe-1b-h100"
    """recorded latency source (replay env and profiles): a key of `flexvlm_env.profiles.loading.LATENCY_SOURCES`
    (molmoe-1b-h100, molmoe-1b-h200, micro-h200, micro-h200-measured), or the path of a `flexvlm-profile stages` or
    `requests` table (your GPU)"""
    requests_table: str | None = None
    """the request table of a --quality table profiled on another request pool (`flexvlm-profile request-table`);
    None: the shipped one (the procedural val pool, flexvlm-profile's default)"""
    requests_per_family: int = 2
    """live env only: procedural requests per family in each pool"""
    runs_dir: Path = Path("runs")
    """where run directories are created"""
    resume: Path | None = None
    """a run directory to continue from its last checkpoint, with the arguments in its args.json (flags given with it
    may change only --runs-dir, --wandb, --wandb-project and --baselines)"""
    wandb: bool = True
    """log to Weights & Biases (offline unless WANDB_API_KEY or WANDB_MODE say otherwise)"""
    wandb_project: str = "flexvlm"
    """W&B project"""
    baselines: bool = True
    """at the end, evaluate the baselines too and print the comparison table"""
    guardrail_estimator: Path | None = None
    """a latency estimator JSON (`flexvlm_env.latency.StageLatencyEstimator`; the repository has some in
    results/e3_estimators/, e.g. molmoe-1b_h100.json, which the installed package does not carry) whose predictions
    build the latency guardrail (MaskablePPO masks, supervised filter, baselines) instead of the recorded profiles'
    latencies"""

    def validate(self) -> None:
        if self.env not in ENV_IDS:
            raise ValueError(f"--env={self.env!r} is not known; allowed: {list(ENV_IDS)}")
        for name, kind in TABLE_ARGS.items():
            if getattr(self, name) is not None:  # requests_table only: None is the shipped request table
                check_source(f"--{name.replace('_', '-')}", getattr(self, name), kind)
        if self.seed < 0:
            raise ValueError(f"--seed={self.seed!r} must be >= 0")
        for name in ("total_env_steps", "eval_every_env_steps", "requests_per_family"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be >= 1")
        if self.eval_requests is not None and self.eval_requests < 1:
            raise ValueError(f"--eval-requests={self.eval_requests!r} must be >= 1 or None")
        if not self.budget_fractions or any(not 0 < f <= 10 for f in self.budget_fractions):
            raise ValueError(f"--budget-fractions={self.budget_fractions!r} must be non-empty numbers in (0, 10]")
        check_number("lam", self.lam, at_least=0)
        if self.guardrail_estimator is not None and not Path(self.guardrail_estimator).is_file():
            raise ValueError(f"--guardrail-estimator={self.guardrail_estimator} is not a file (a StageLatencyEstimator JSON)")
        if self.resume is not None and not (Path(self.resume) / "args.json").exists():
            raise ValueError(f"--resume={self.resume} is not a run directory (no args.json in it)")
        self.absolutize_paths()

    def absolutize_paths(self) -> None:
        """Make the files among the arguments absolute paths, so that args.json (and --resume) work from any directory."""
        for name, kind in TABLE_ARGS.items():
            value = getattr(self, name)
            if value is not None and value not in SHIPPED[kind]:
                setattr(self, name, str(Path(value).resolve()))
        if self.guardrail_estimator is not None:
            self.guardrail_estimator = Path(self.guardrail_estimator).resolve()


def make_env(args: CommonArgs, split: str, episode_length: int = 16) -> gym.Env:
    """The env of `args.env` serving the train or the held-out requests.

    Replay: the two halves of the recorded pool. Live: the procedural train split to learn on and
    the val split to evaluate on."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; allowed: 'train', 'heldout'")
    common = {"budget_fractions": args.budget_fractions, "lam": args.lam, "episode_length": episode_length}
    if args.env == "FlexVLMReplay-v0":
        return gym.make(args.env, quality=args.quality, latency=args.latency, requests=args.requests_table, split=split,
                        **common)
    return gym.make(args.env, split="train" if split == "train" else "val",
                    requests_per_family=args.requests_per_family, **common)


def load_profiles(args: CommonArgs) -> ProfileTables:
    """The recorded train-half profiles (what LUT, supervised, the guardrail and baselines read)."""
    return ProfileTables.load(quality=args.quality, latency=args.latency, split="train", requests=args.requests_table)


def make_guardrail(args: CommonArgs, profiles: ProfileTables) -> LatencyGuardrail:
    """The latency guardrail: from the train-half profiles, or from `--guardrail-estimator`'s
    predictions for the same train-half requests (their token counts, predicted output lengths)."""
    if args.guardrail_estimator is None:
        return LatencyGuardrail.from_profiles(profiles)
    from flexvlm_env.latency import StageLatencyEstimator
    from flexvlm_env.profiles import load_replay_data

    data = load_replay_data(quality=args.quality, latency=args.latency, requests=args.requests_table)
    return LatencyGuardrail.from_estimator(data, StageLatencyEstimator.load(args.guardrail_estimator), split="train")


def eval_requests(args: CommonArgs) -> int | None:
    return args.eval_requests if args.eval_requests is not None or args.env == "FlexVLMReplay-v0" else 18


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def args_record(method: str, args: CommonArgs) -> dict:
    """A run's `args.json`: the method and every argument, JSON-typed."""
    return {"method": method, **{k: _jsonable(v) for k, v in dataclasses.asdict(args).items()}}


def _from_json(hint: Any, value: Any) -> Any:
    """An args.json value as the dataclass field typed `hint` holds it (JSON has lists and strings, not tuples and Paths)."""
    if value is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if Path in options:
        return Path(value)
    if isinstance(value, list) and any(o is tuple or typing.get_origin(o) is tuple for o in options):
        return tuple(value)
    return value


def resume_args(defaults: CommonArgs, run_dir: Path) -> CommonArgs:
    """`defaults` with every argument the run in `run_dir` was started with (its args.json): what a
    resumed run trains with. Arguments the file lacks (a run made before they existed) keep `defaults`'."""
    path = Path(run_dir) / "args.json"
    if not path.is_file():
        raise ValueError(f"--resume={run_dir} is not a run directory (no args.json in it)")
    saved = json.loads(path.read_text())
    hints = typing.get_type_hints(type(defaults))
    values = {f.name: _from_json(hints[f.name], saved[f.name]) for f in dataclasses.fields(defaults)
              if f.name in saved and f.name != "resume"}
    return dataclasses.replace(defaults, **values, resume=Path(run_dir))


def absolute_paths(record: dict) -> dict:
    """An args.json record with its file arguments as absolute paths, as `CommonArgs.absolutize_paths` stores them
    (runs made before 2026-12-01 kept some as given, relative to the directory they ran in)."""
    out = dict(record)
    for key in (*FILE_ARGS, *TABLE_ARGS):
        value = out.get(key)
        if isinstance(value, str) and value not in SHIPPED.get(TABLE_ARGS.get(key), {}):
            out[key] = str(Path(value).resolve())
    return out


def check_resume(method: str, args: CommonArgs) -> None:
    """Raise ValueError unless `args` may resume the run `args.resume` names: the same method, and the
    arguments its args.json records, but for `RESUME_MAY_CHANGE`."""
    saved = json.loads((Path(args.resume) / "args.json").read_text())
    if saved.get("method") != method:
        raise ValueError(f"--resume={args.resume} is a {saved.get('method')!r} run, not {method!r}")
    given = args_record(method, args)
    saved = absolute_paths(saved)
    changed = [f"--{k.replace('_', '-')}={given[k]!r} (the run's is {saved[k]!r})" for k in saved
               if k in given and k not in RESUME_MAY_CHANGE and given[k] != saved[k]]
    if changed:
        may_change = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUME_MAY_CHANGE - {"resume"}))
        raise ValueError(f"--resume={args.resume}: a resumed run keeps the arguments it was started with (its args.json); "
                         f"given: {'; '.join(changed)}. Drop them (`flexvlm-train {method} --resume RUN_DIR` reads "
                         f"args.json), or start a new run; only {may_change} may change")


class Run:
    """The run directory, its curves and W&B (see the module docstring)."""

    def __init__(self, method: str, args: CommonArgs):
        args.validate()
        self.method = method
        self.args = args
        if args.resume is not None:
            check_resume(method, args)
            self.dir = Path(args.resume)
        else:
            stamp = int(time.time())
            Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
            while True:  # two runs of one (method, seed) started within a second get the next second
                self.dir = Path(args.runs_dir) / f"{args.env}__{method}__{args.seed}__{stamp}"
                try:
                    self.dir.mkdir()
                    break
                except FileExistsError:
                    stamp += 1
            (self.dir / "args.json").write_text(json.dumps(args_record(method, args), indent=1))
        self.name = self.dir.name
        self.curves_path = self.dir / CURVES_FILE
        self.checkpoint_dir = self.dir / CHECKPOINT_DIR
        recover_directory(self.checkpoint_dir)  # a crash mid-save leaves the last checkpoint renamed aside
        self.started = time.perf_counter()
        self.wall_clock_offset_s = 0.0
        self._wandb = None
        self.wandb_log = WandbLog(None, self.curves_path, "env_steps")
        if args.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
            run_id = f"{method}-" + hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:10]
            self._wandb = wandb.init(project=args.wandb_project, name=self.name, id=run_id, resume="allow",
                                     config=args_record(method, args),
                                     dir=str(self.dir), reinit="finish_previous")
            self.wandb_log = WandbLog(self._wandb, self.curves_path, "env_steps")

    @property
    def wall_clock_s(self) -> float:
        return self.wall_clock_offset_s + time.perf_counter() - self.started

    def resumed_from(self, env_steps: int, wall_clock_s: float) -> None:
        """Record that training continues from a checkpoint at `env_steps`: later curve lines go, and W&B gets the
        earlier ones it has not had (a crash between a checkpoint and `checkpointed`)."""
        self.wall_clock_offset_s = wall_clock_s
        if self.curves_path.exists():
            lines = [line for line in self.curves_path.read_text().splitlines()
                     if line.strip() and json.loads(line)["env_steps"] <= env_steps]
            self.curves_path.write_text("".join(line + "\n" for line in lines))
        self.checkpointed(env_steps)

    def checkpointed(self, env_steps: int) -> None:
        """The run's state at `env_steps` is saved: its curve lines up to there are final, and go to W&B now (a line
        logged after the last checkpoint could still be dropped and logged again; see `WandbLog`)."""
        self.wandb_log.send_through(env_steps)

    def log(self, env_steps: int, metrics: Mapping[str, float]) -> dict:
        # NaN (e.g. retention when the full configuration scored 0 on a tiny evaluation) is not JSON
        metrics = {k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()}
        record = {"env_steps": int(env_steps), "wall_clock_s": round(self.wall_clock_s, 3), **metrics}
        with self.curves_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        return record

    def log_eval(self, env_steps: int, result: dict, train_metrics: Mapping[str, float] | None = None) -> dict:
        metrics = {f"eval/{k}": v for k, v in result["mean"].items()}
        for fraction, values in result["by_fraction"].items():
            metrics[f"eval_by_fraction/{fraction}/quality_retention"] = values["quality_retention"]
            metrics[f"eval_by_fraction/{fraction}/violation_rate"] = values["violation_rate"]
        metrics.update({f"train/{k}": v for k, v in (train_metrics or {}).items()})
        return self.log(env_steps, metrics)

    def curves(self) -> list[dict]:
        return read_curves(self.dir)

    def finish(self, controller: Controller, profiles: ProfileTables | None, heldout_env: gym.Env,
               env_steps: int) -> dict:
        """Save the controller, evaluate it (and the baselines) on the held-out requests, print
        the comparison table, write `final.json` and the learning-curve plot."""
        args = self.args
        controller.save(self.dir / "controller", metadata={"run": self.name, "env_steps": env_steps})
        n = eval_requests(args)
        results = {self.method: evaluate(controller, heldout_env, args.budget_fractions, n, args.seed)}
        overhead = {self.method: decision_overhead_ms(controller, heldout_env, seed=args.seed)}
        if args.baselines:
            from baselines import make_baselines

            profiles = profiles or load_profiles(args)
            for name, baseline in make_baselines(profiles, args.budget_fractions, make_guardrail(args, profiles)).items():
                results[name] = evaluate(baseline, heldout_env, args.budget_fractions, n, args.seed)
                overhead[name] = decision_overhead_ms(baseline, heldout_env, seed=args.seed)
        final = {"run": self.name, "method": self.method, "env": args.env, "seed": args.seed, "env_steps": env_steps,
                 "wall_clock_s": self.wall_clock_s, "results": results, "decision_overhead_ms": overhead}
        (self.dir / "final.json").write_text(json.dumps(final, indent=1))
        plot_curves([self.curves()], [self.name], self.dir / "learning_curves.png")
        if self._wandb is not None:  # before the table, so that W&B's own summary does not bury it
            self.wandb_log.send_through()  # the run is done: no line can be dropped any more
            self._wandb.summary.update({f"final/{k}": v for k, v in results[self.method]["mean"].items()})
            self._wandb.finish()
        table = format_comparison(results, args.budget_fractions)
        print(f"\n{self.name}: held-out requests ({results[self.method]['n_requests']} x {len(args.budget_fractions)} budgets)"
              f", quality retention / violation rate / P95 latency per budget fraction\n{table}")
        print(f"run directory: {self.dir}  (curves.jsonl, final.json, learning_curves.png, controller/)")
        return final


def plot_curves(runs: Sequence[list[dict]], labels: Sequence[str], path: Path,
                metrics: Sequence[str] = ("eval/reward", "eval/quality_retention", "eval/violation_rate", "eval/latency_p95_ms")) -> Path:
    """Held-out metrics against env steps, one line per run (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for records, label in zip(runs, labels):
            points = [(r["env_steps"], r[metric]) for r in records if metric in r]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set_xlabel("env steps")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_curves(run_dir: Path) -> list[dict]:
    """A run directory's curve lines (`curves.jsonl`; none if it has none yet)."""
    path = Path(run_dir) / CURVES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_points(total_env_steps: int, every: int, start: int = 0) -> list[int]:
    """Env-step counts at which to evaluate: every `every` steps after `start`, and the end."""
    points = list(range(every, total_env_steps, every)) + [total_env_steps]
    return [p for p in points if p > start]


def whole_unit_points(total_env_steps: int, every: int, unit: int, start: int = 0) -> list[int]:
    """`eval_points` for a method that spends env steps in whole units (a PPO rollout, a profiled request's
    grid): every ~`every` steps rounded to whole units, up to the total rounded down (at least one unit)."""
    total = max(unit, total_env_steps // unit * unit)
    return eval_points(total, max(1, round(every / unit)) * unit, start)


@dataclass
class Progress:
    """What a checkpoint records besides the method's tensors."""

    env_steps: int = 0
    wall_clock_s: float = 0.0
    extra: dict = field(default_factory=dict)
