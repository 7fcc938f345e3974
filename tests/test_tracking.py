"""W&B receives each curve point once, also across a crash and a resume (flexvlm_env.training.tracking)."""
from __future__ import annotations

import json
import sys
import types

import pytest

from flexvlm_env.training.tracking import WandbLog


class FakeWandb:
    """Stands in for the `wandb` module: records what each run was sent, refusing (as W&B does) nothing, so that a
    repeated step shows up in `steps`."""

    def __init__(self):
        self.steps: list[int] = []
        self.records: list[dict] = []
        self.fail_at: int | None = None  # raise when asked to log this step (a crash mid-send)

    def module(self) -> types.ModuleType:
        fake = self

        class FakeRun:
            summary: dict = {}

            def log(self, record, step):
                if step == fake.fail_at:
                    fake.fail_at = None
                    raise Crash
                fake.steps.append(step)
                fake.records.append(dict(record))

            def finish(self):
                pass

        module = types.ModuleType("wandb")
        module.init = lambda **kwargs: FakeRun()
        return module


class Crash(Exception):
    pass


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_wandb_log_sends_each_line_once_up_to_the_step_asked(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "x": s / 10}) + "\n" for s in (10, 20, 30)))
    fake = FakeWandb()
    run = fake.module().init()
    sender = WandbLog(run, log, "step")
    assert sender.send_through(20) == 2 and fake.steps == [10, 20]
    assert sender.send_through(20) == 0
    # another process (a resumed run) picks up where the file says the last one stopped
    assert WandbLog(run, log, "step").send_through() == 1 and fake.steps == [10, 20, 30]
    assert fake.records[-1] == {"step": 30, "x": 3.0}
    assert WandbLog(None, log, "step").send_through() == 0  # W&B off: nothing to do


@pytest.mark.parametrize("crash", ["before_checkpoint", "while_sending"])
def test_trainer_sends_each_point_once_across_a_crash_and_resume(crash, tmp_path, monkeypatch):
    """A crash between an evaluation's curve line and its checkpoint makes the resumed run log that point again;
    a crash after the checkpoint, before W&B got the line, must not lose it. Either way W&B ends with every point
    once, in order, with the values curves.jsonl holds."""
    from trainers import supervised
    from trainers.cli import parse_args

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = ["--total-env-steps", "4200", "--eval-every-env-steps", "1400", "--eval-requests", "20", "--no-baselines",
            "--runs-dir", str(tmp_path)]
    real_save, saves = supervised.save_training_state, []

    def save_then_crash(*args, **kwargs):
        saves.append(1)
        if crash == "before_checkpoint" and len(saves) == 3:
            raise Crash
        return real_save(*args, **kwargs)

    monkeypatch.setattr(supervised, "save_training_state", save_then_crash)
    if crash == "while_sending":
        fake.fail_at = 2800
    with pytest.raises(Crash):
        supervised.main(parse_args("supervised", argv))
    (run,) = tmp_path.iterdir()
    monkeypatch.setattr(supervised, "save_training_state", real_save)
    supervised.main(parse_args("supervised", ["--resume", str(run)]))
    assert fake.steps == [1400, 2800, 4200]
    assert fake.records == lines(run / "curves.jsonl")


@pytest.mark.parametrize("method, flag", [
    ("lut", "--lam"), ("lut", "--max-violation-rate"),
    ("supervised", "--learning-rate"), ("supervised", "--weight-decay"),
    ("ppo", "--ent-coef"), ("ppo", "--vf-coef"), ("ppo", "--clip-range"), ("ppo", "--max-grad-norm"), ("ppo", "--gamma"),
    ("dpo", "--sft-weight"), ("dpo", "--beta"),
    ("grpo", "--entropy-coef"), ("grpo", "--beta"), ("grpo", "--epsilon"), ("grpo", "--entropy-target"),
    ("grpo", "--invalid-penalty"),
])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numeric_flags_are_usage_errors(method, flag, value):
    """NaN fails every comparison, so `if x < 0: raise` lets it through and training runs on NaN; inf passes `x > 0`."""
    from trainers.cli import parse_args

    args = parse_args(method, [flag, value])
    with pytest.raises(ValueError, match=f"{flag}={value} must be a finite number"):
        args.validate()


def test_train_micro_sends_each_step_once_across_a_crash_and_resume(tmp_path, monkeypatch):
    """scripts/train_micro.py --track: a crash after log lines but before the checkpoint that covers them; the resumed
    run logs those steps again, and W&B must get each step once, with the values log.jsonl ends with."""
    from conftest import load_script

    script = load_script("train_micro")
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = dict(run_dir=str(tmp_path / "run"), batch_size=2, device="cpu", num_workers=0, warmup_steps=1,
                  decay_frac=0.0, log_every=1, finalize=False, checkpoint_minutes=1e9, track=True)
    script.main(script.Args(total_steps=1, **common))  # (a training step takes seconds on a CPU: one per run)
    assert fake.steps == [1]
    real_save = script.save_training_state

    def crash_at_checkpoint(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(script, "save_training_state", crash_at_checkpoint)
    with pytest.raises(Crash):
        script.main(script.Args(total_steps=2, **common))
    assert [r["step"] for r in lines(tmp_path / "run" / "log.jsonl")] == [1, 2]
    monkeypatch.setattr(script, "save_training_state", real_save)
    script.main(script.Args(total_steps=2, **common))
    assert fake.steps == [1, 2]
    assert fake.records == lines(tmp_path / "run" / "log.jsonl")
