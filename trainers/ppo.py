"""`flexvlm-train ppo` / `flexvlm-train maskable_ppo`: Stable-Baselines3 PPO on the FlexVLM env.

PPO learns on the train requests (`make_env(args, "train")`, `n_envs` copies in a `DummyVecEnv`,
sub-env i seeded `seed + i`), observing the log-scaled observation (`ScaledObservation`) and
acting with the env's `MultiDiscrete([7, 4, 5])` knobs. `Args.maskable` (what `flexvlm-train
maskable_ppo` sets) trains sb3-contrib's MaskablePPO instead, on the flat `Discrete(140)` action
(`DiscreteKnobs`) masked by the latency guardrail built from the train-half profiles, so that it
never explores a configuration the profiles say cannot meet the budget.

Each request's reward depends only on the configuration chosen for it, never on earlier actions:
the env is a contextual bandit, so the return to learn from is the immediate reward (`gamma=0`)
and PPO's advantage is reward minus the value network's prediction for the request.

Training runs in chunks of whole rollouts (`n_steps * n_envs` env steps; `learn(...,
reset_num_timesteps=False)`), and after each chunk the policy is evaluated on the held-out requests
(`agents.evaluation.evaluate`), the curves get a line, and the checkpoint (policy, Adam moments,
env steps, wall-clock) is written; `--resume RUN_DIR` continues from it. A resumed run restores
the weights and optimizer exactly and re-seeds the training envs from (seed, env steps): it is
reproducible, though its episodes are not those the uninterrupted run would have drawn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

from agents.evaluation import evaluate
from agents.features import ScaledObservation
from agents.guardrail import LatencyGuardrail
from agents.ppo import ACTIVATIONS, PPOController, policy_kwargs, sb3_policy_kwargs
from flexvlm_env.envs.wrappers import DiscreteKnobs
from flexvlm_env.training.state import load_training_state, save_training_state

from .common import CommonArgs, Run, check_number, eval_requests, load_profiles, make_env, make_guardrail, whole_unit_points


@dataclass
class Args(CommonArgs):
    total_env_steps: int = 126_000
    """env steps (requests served) to train for; rounded down to whole rollouts (n_envs x n_steps)"""
    eval_every_env_steps: int = 12_600
    """evaluate on the held-out requests (and checkpoint) every this many env steps (rounded to whole rollouts)"""
    # Set by the method name (`flexvlm-train maskable_ppo`), not a flag: `ppo --maskable` would be a maskable_ppo run
    # under another name.
    maskable: tyro.conf.Suppress[bool] = False
    """train MaskablePPO on the flat Discrete(140) action, masked by the latency guardrail (`flexvlm-train maskable_ppo`)"""
    # Defaults (tuned on the replay env, seeds 0-2): rollouts of 8 x 105 = 840 requests divide the
    # 12,600-step evaluation interval and the 126,000-step budget exactly (150 PPO updates), and a
    # one-layer 64-unit MLP at lr 1e-3 reached held-out reward 0.373 / 0.380 (PPO / MaskablePPO, seed
    # 0) against the LUT's 0.374 and random's 0.217; wider or deeper nets fit the train requests
    # better and the held-out ones no better.
    n_envs: int = 8
    """training envs stepped together (DummyVecEnv); sub-env i is seeded seed + i (live env: each loads the model, use 1)"""
    n_steps: int = 105
    """env steps per sub-env per rollout: a rollout (one PPO update) is n_envs x n_steps requests"""
    batch_size: int = 210
    """minibatch size of the PPO update"""
    n_epochs: int = 10
    """passes over each rollout in the PPO update"""
    learning_rate: float = 1e-3
    """Adam learning rate (constant)"""
    ent_coef: float = 0.01
    """entropy bonus weight (keeps exploring configurations early on)"""
    # A configuration chosen for one request never changes later requests (the env is a contextual
    # bandit), so the only return worth learning is the immediate reward: gamma = 0. A larger gamma
    # only adds the noise of future, unrelated requests' rewards to every advantage.
    gamma: float = 0.0
    """discount factor; 0 because the env is a contextual bandit (no action affects later requests)"""
    gae_lambda: float = 0.95
    """GAE lambda (irrelevant when gamma = 0)"""
    clip_range: float = 0.2
    """PPO's policy ratio clip"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""
    net_arch: tuple[int, ...] = (64,)
    """hidden layer sizes of the policy and of the value MLP (each its own); one layer generalizes to the
    held-out requests as well as two or more, which fit the 900 train requests' noise"""
    activation: Literal["tanh", "relu", "elu", "gelu", "silu", "leaky_relu"] = "tanh"
    """hidden activation of the MLPs"""
    torch_threads: int = 1
    """torch CPU threads (the networks are tiny: one thread is the fastest)"""

    def validate(self) -> None:
        super().validate()
        for name in ("n_envs", "n_steps", "n_epochs", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        rollout = self.n_envs * self.n_steps
        if not 2 <= self.batch_size <= rollout:
            raise ValueError(f"--batch-size={self.batch_size!r} must be in 2..n_envs x n_steps={rollout}")
        if self.total_env_steps < rollout:
            raise ValueError(f"--total-env-steps={self.total_env_steps} is less than one rollout (n_envs x n_steps = "
                             f"{self.n_envs} x {self.n_steps} = {rollout}); lower --n-steps/--n-envs or train longer")
        for name in ("learning_rate", "clip_range", "max_grad_norm"):
            check_number(name, getattr(self, name), above=0)
        for name in ("gamma", "gae_lambda"):
            check_number(name, getattr(self, name), at_least=0, at_most=1)
        for name in ("ent_coef", "vf_coef"):
            check_number(name, getattr(self, name), at_least=0)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--activation={self.activation!r} is not known; allowed: {sorted(ACTIVATIONS)}")
        if any(n < 1 for n in self.net_arch):
            raise ValueError(f"--net-arch={self.net_arch!r}: layer sizes must be >= 1")


def rollout_points(args: Args, start: int = 0) -> list[int]:
    """Env-step counts at which to evaluate: whole rollouts, every ~eval_every, and the (rounded) end."""
    return whole_unit_points(args.total_env_steps, args.eval_every_env_steps, args.n_envs * args.n_steps, start)


def wrap_train_env(env, guardrail: LatencyGuardrail | None):
    """A training env: scaled observations, and for MaskablePPO the flat guardrail-masked action."""
    from stable_baselines3.common.monitor import Monitor

    env = ScaledObservation(env)
    if guardrail is not None:
        env = DiscreteKnobs(env, mask_fn=guardrail.mask_fn)
    return Monitor(env)  # records episode rewards for the training metrics


def build_model(args: Args, make_env_fn, guardrail: LatencyGuardrail | None):
    """(SB3 PPO or MaskablePPO on a DummyVecEnv of `args.n_envs` wrapped `make_env_fn()` envs, the
    policy's JSON config). The vec env seeds sub-env i with `args.seed + i`."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    if args.maskable:
        from sb3_contrib import MaskablePPO as Algorithm
    else:
        from stable_baselines3 import PPO as Algorithm

    vec_env = DummyVecEnv([lambda: wrap_train_env(make_env_fn(), guardrail) for _ in range(args.n_envs)])
    config = policy_kwargs(args.net_arch, args.activation)
    model = Algorithm(
        "MultiInputPolicy", vec_env, learning_rate=args.learning_rate, n_steps=args.n_steps,
        batch_size=args.batch_size, n_epochs=args.n_epochs, gamma=args.gamma, gae_lambda=args.gae_lambda,
        clip_range=args.clip_range, ent_coef=args.ent_coef, vf_coef=args.vf_coef, max_grad_norm=args.max_grad_norm,
        policy_kwargs=sb3_policy_kwargs(config), seed=args.seed, device="cpu", verbose=0,
    )
    return model, config


def train_metrics(model) -> dict[str, float]:
    """Mean reward per request over the last episodes and of the last rollout, and PPO's losses."""
    rollout_reward = float(np.mean(model.rollout_buffer.rewards))
    # policy_reward: the name every sampling method (DPO's policy candidates, GRPO's completions) logs it under
    metrics: dict[str, float] = {"rollout_reward": rollout_reward, "policy_reward": rollout_reward}
    if model.ep_info_buffer:
        metrics["reward_per_request"] = float(np.mean([ep["r"] / ep["l"] for ep in model.ep_info_buffer]))
    values = model.logger.name_to_value
    if "train/entropy_loss" in values:
        metrics["entropy"] = -float(values["train/entropy_loss"])
    for key in ("approx_kl", "clip_fraction", "value_loss", "policy_gradient_loss", "explained_variance"):
        if f"train/{key}" in values:
            metrics[key] = float(values[f"train/{key}"])
    metrics["n_updates"] = int(model._n_updates)
    return metrics


def main(args: Args) -> dict:
    method = "maskable_ppo" if args.maskable else "ppo"
    args.validate()  # before the run directory exists
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    torch.set_num_threads(args.torch_threads)
    run = Run(method, args)
    rollout = args.n_envs * args.n_steps
    if args.total_env_steps % rollout:
        print(f"{method}: --total-env-steps={args.total_env_steps} is not a whole number of rollouts "
              f"({args.n_envs} x {args.n_steps} = {rollout}); training for {args.total_env_steps // rollout * rollout}")
    profiles = load_profiles(args)
    guardrail = make_guardrail(args, profiles) if args.maskable else None
    model, config = build_model(args, partial(make_env, args, "train"), guardrail)
    # An explicit logger: learn()'s default one makes an empty SB3-<time> directory in the temp
    # folder on every call (hundreds per test run). Our metrics go through Run, not SB3's writers.
    model.set_logger(Logger(folder=None, output_formats=[]))
    heldout = make_env(args, "heldout", episode_length=1)
    controller = PPOController(model.policy, config, args.maskable, guardrail, heldout.unwrapped.grid)
    # what must match for a checkpoint to be resumed with these arguments
    identity = {"method": method, "policy_kwargs": config, "n_envs": args.n_envs, "n_steps": args.n_steps}

    env_steps = 0
    if args.resume is not None:
        wall_clock_s = 0.0
        if (run.checkpoint_dir / "state.json").exists():
            saved = json.loads((run.checkpoint_dir / "state.json").read_text())["progress"]
            mismatched = {k: (saved["identity"].get(k), v) for k, v in identity.items() if saved["identity"].get(k) != v}
            if mismatched:
                raise ValueError(f"--resume={args.resume}: its checkpoint was trained with different settings "
                                 f"(saved, given): {mismatched}; pass the run's original arguments")
            progress = load_training_state(run.checkpoint_dir, model.policy, model.policy.optimizer)
            env_steps, wall_clock_s = int(progress["env_steps"]), float(progress["wall_clock_s"])
            model.num_timesteps = env_steps
            model._n_updates = int(progress["n_updates"])
            model.set_random_seed(args.seed + env_steps)  # a fresh, reproducible stream of training episodes
        run.resumed_from(env_steps, wall_clock_s)
        print(f"{method}: resuming {run.dir} at {env_steps} env steps")

    class ProgressBar(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            bar.update(rollout)

    points = rollout_points(args, env_steps)
    bar = tqdm(total=points[-1] if points else env_steps, initial=env_steps, desc=method, unit="step", unit_scale=True)
    for point in points:
        model.learn(point - env_steps, callback=ProgressBar(), log_interval=None, reset_num_timesteps=False)
        env_steps = int(model.num_timesteps)
        assert env_steps == point, (env_steps, point)  # whole rollouts: exact counts
        result = evaluate(controller, heldout, args.budget_fractions, eval_requests(args), args.seed)
        record = run.log_eval(env_steps, result, train_metrics(model))
        bar.set_postfix(reward=f"{record['eval/reward']:.3f}", viol=f"{record['eval/violation_rate']:.3f}")
        save_training_state(run.checkpoint_dir, model.policy, model.policy.optimizer, {
            "env_steps": env_steps, "wall_clock_s": run.wall_clock_s, "n_updates": int(model._n_updates),
            "identity": identity,
        })
        run.checkpointed(env_steps)
    bar.close()
    model.get_env().close()
    model.policy.set_training_mode(False)
    return run.finish(controller, profiles, heldout, env_steps)
