"""Replay a recorded episode file and check it: `validate(path)` and the `flexvlm-validate` command.

Each recorded step (request, configuration, budget) is served again by an environment, the
recorded file's own by default (rebuilt from the id and kwargs in its metadata) or another one
(`--env`), e.g. a live recording checked against the replay tables. Quality and answer must
reproduce exactly; latency cannot (it is measured or resampled), so the report gives the ratio
measured / recorded as median and P95.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from ..config import KnobGrid
from .core import FlexVLMCoreEnv
from .registration import register_envs
from .wrappers import RECORD_METADATA_KEY


@dataclass
class ValidationReport:
    """Outcome of `validate`: counts, the first mismatches, and latency ratio statistics."""

    path: str
    env: str
    steps: int
    quality_mismatches: int = 0
    answer_mismatches: int = 0
    missing_requests: int = 0
    latency_ratio_median: float = float("nan")
    latency_ratio_p95: float = float("nan")
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        """True when every recorded quality and answer came out the same."""
        return self.quality_mismatches == 0 and self.answer_mismatches == 0 and self.missing_requests == 0

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.steps} steps replayed on {self.env}",
            f"  quality reproduced: {self.steps - self.quality_mismatches - self.missing_requests}/{self.steps}",
            f"  answer reproduced:  {self.steps - self.answer_mismatches - self.missing_requests}/{self.steps}",
            f"  latency measured/recorded: median {self.latency_ratio_median:.3f}, P95 {self.latency_ratio_p95:.3f}",
        ]
        if self.missing_requests:
            lines.append(f"  {self.missing_requests} recorded requests are not in the env's request pool")
        for example in self.examples:
            lines.append(f"  mismatch: {example}")
        lines.append("REPRODUCED" if self.reproduced else "NOT REPRODUCED")
        return "\n".join(lines)


def read_record(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(rows as a pandas DataFrame, the recorder's metadata dict) of a recorded episode file."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recorded episode file at {path}")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(RECORD_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no '{RECORD_METADATA_KEY.decode()}' metadata: it was not written by EpisodeRecorder")
    return table.to_pandas(), json.loads(raw)


def _make_env(description: dict[str, Any], env: str | None, env_kwargs: dict[str, Any]) -> gym.Env:
    register_envs()
    recorded_id = description.get("env_id")
    env_id = env or recorded_id
    if env_id is None:
        raise ValueError("the recording names no env id (its env was not made with gym.make); pass env=<id or env>")
    kwargs = dict(description.get("env_kwargs") or {}) if env_id == recorded_id else {}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if isinstance(kwargs.get("grid"), dict):
        kwargs["grid"] = KnobGrid(**{key: tuple(value) for key, value in kwargs["grid"].items()})
    kwargs.update(env_kwargs)
    return gym.make(env_id, **kwargs)


# What setting up a validation raises for a bad record, env id or env kwargs (pyarrow's ArrowInvalid
# for a file that is not Parquet is a ValueError; a kwarg the env does not take, a TypeError).
SETUP_ERRORS = (ValueError, TypeError, OSError, KeyError, gym.error.Error)


def validate(path: str | Path, env: gym.Env | str | None = None, max_examples: int = 5, **env_kwargs) -> ValidationReport:
    """Serve every recorded (request, configuration, budget) again and compare (module docstring).

    Args:
        path: a Parquet file written by `EpisodeRecorder`.
        env: an env instance, an env id, or None for the recording's own env id and kwargs.
        max_examples: how many mismatches to describe in the report.
        env_kwargs: override or add kwargs of the env that is made (ignored for an instance).
    """
    frame, env, own_env = prepare(path, env, env_kwargs)
    try:
        return replay(path, frame, env, max_examples)
    finally:
        if own_env:
            env.close()


def prepare(path: str | Path, env: gym.Env | str | None, env_kwargs: dict[str, Any]) -> tuple[Any, gym.Env, bool]:
    """(recorded rows, the env to replay them on, whether this call made it) — everything `validate`
    checks before the first step is replayed, so that a setup problem (one of `SETUP_ERRORS`) is told
    apart from a recording that does not reproduce."""
    frame, description = read_record(path)
    own_env = not isinstance(env, gym.Env)
    if own_env:
        env = _make_env(description, env, env_kwargs)
    try:
        base = env.unwrapped
        if not isinstance(base, FlexVLMCoreEnv):
            raise ValueError(f"env={env} must be a FlexVLM environment (FlexVLM-v0 or FlexVLMReplay-v0)")
        _check_configs_on_grid(frame, base.grid)
    except BaseException:
        if own_env:
            env.close()
        raise
    return frame, env, own_env


def _check_configs_on_grid(frame, grid: KnobGrid) -> None:
    # The env could not even take the recorded action: a setup problem, not a mismatch.
    for name in ("crops", "top_k", "active_blocks"):
        off = sorted(set(frame[name].tolist()) - set(getattr(grid, name)))
        if off:
            raise ValueError(f"recorded {name} values {off} are not on the env's grid {grid}")


def replay(path: str | Path, frame, env: gym.Env, max_examples: int = 5) -> ValidationReport:
    """Step `env` through every recorded row of `frame` (from `prepare`) and compare."""
    base = env.unwrapped
    grid = base.grid
    report = ValidationReport(path=str(path), env=base.spec.id if base.spec is not None else type(base).__name__, steps=len(frame))
    ratios = []
    for row in frame.itertuples(index=False):
        if row.request_id not in base.request_index_of:
            report.missing_requests += 1
            if len(report.examples) < max_examples:
                report.examples.append({"request_id": row.request_id, "problem": "not in the env's request pool"})
            continue
        action = np.array([grid.crops.index(row.crops), grid.top_k.index(row.top_k), grid.active_blocks.index(row.active_blocks)])
        env.reset(seed=0, options={"request_id": row.request_id, "budget_ms": float(row.budget_ms)})
        _, _, _, _, info = env.step(action)
        quality_ok = info["quality"] == row.quality
        answer_ok = info["answer"] == row.answer
        report.quality_mismatches += not quality_ok
        report.answer_mismatches += not answer_ok
        ratios.append(info["latency_ms"] / row.total_ms)
        if not (quality_ok and answer_ok) and len(report.examples) < max_examples:
            report.examples.append(
                {"request_id": row.request_id, "config": info["config"], "recorded": (row.quality, row.answer),
                 "replayed": (info["quality"], info["answer"])}
            )
    if ratios:
        report.latency_ratio_median = float(np.median(ratios))
        report.latency_ratio_p95 = float(np.percentile(ratios, 95))
    return report


def main(argv: list[str] | None = None) -> int:
    """`flexvlm-validate RECORD.parquet [--env ID] [--env-kwargs JSON]`: exit status 0 reproduced,
    1 not reproduced, 2 a usage error (a bad record, env id or env kwargs: nothing was compared)."""
    parser = argparse.ArgumentParser(prog="flexvlm-validate", description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="Parquet file written by EpisodeRecorder")
    parser.add_argument("--env", default=None, help="env id to replay on (default: the recording's own)")
    parser.add_argument("--env-kwargs", default="{}", help='JSON kwargs for the env, e.g. \'{"device": "cpu"}\'')
    args = parser.parse_args(argv)
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--env-kwargs={args.env_kwargs!r} is not valid JSON: {error}")
    if not isinstance(env_kwargs, dict):
        parser.error(f"--env-kwargs={args.env_kwargs!r} must be a JSON object")
    if not args.record.is_file():
        parser.error(f"record={str(args.record)!r}: no such file (a Parquet file written by EpisodeRecorder)")
    try:
        frame, env, _ = prepare(args.record, args.env, env_kwargs)
    except SETUP_ERRORS as error:
        # A usage error, not "not reproduced" (exit status 1): nothing was compared.
        message = " ".join(str(error).split()) or type(error).__name__
        parser.error(f"record={str(args.record)!r} cannot be replayed (nothing was compared): {message}")
    try:
        report = replay(args.record, frame, env)
    finally:
        env.close()
    print(report.summary())
    return 0 if report.reproduced else 1


if __name__ == "__main__":
    sys.exit(main())
