"""`flexvlm-train grpo`: a tiny causal LM that writes the configuration, trained with TRL's `GRPOTrainer`.

The policy is `agents.lm.LMController`'s model: a randomly initialised two-layer Llama over a compact vocabulary.
A prompt is the text rendering of a train-half observation (`agents.lm.render_observation`: family and bucketed
log-scaled features); the completion names the three knobs (``crops=4 top_k=2 active_blocks=12<eos>``).

1. Format warm start (`agents.lm.format_warm_start`): a few hundred next-token steps on *uniformly random*
   configurations, so the freshly initialised model writes well-formed answers at all. It learns the grammar
   and nothing about the task (the labels ignore the prompt; no env step is taken), so it starts GRPO as a
   near-uniform random policy. `--init-from` starts from a saved LM controller instead (no warm start), e.g. a
   DPO run's: at a quarter of the default learning rate, DPO then GRPO beat GRPO alone at 5 seeds of 5 over
   E5's 126,000 env steps (results/device/session30, README "GRPO after DPO").
2. GRPO (`trl.GRPOTrainer` and `trl.GRPOConfig`, unmodified): for each prompt of a batch, `num_generations`
   completions are sampled; the reward function parses each (`agents.lm.parse_config`) and, when valid, pins
   the prompt's request and budget in a train-split env (`env.reset(options={"request_id", "budget_fraction"})`)
   and executes the configuration (`env.step`), whose reward is the completion's. Invalid completions get
   `invalid_penalty` (below any valid reward) without an env step. Env steps are the completions the env
   scored; training stops before a batch could take them past `total_env_steps`, or once `max_invalid_batches`
   generated batches in a row had no valid completion (all of a group's rewards equal, nothing left to learn;
   the run is evaluated there and says so). Each generated batch is trained
   on for `num_iterations` (4) optimizer steps, its importance ratio clipped as in PPO. With one step per batch
   the policy learned only which configurations are cheap on average and ignored its prompt: one or two
   configurations for all 4,500 held-out (request, budget) pairs, and a held-out reward of 0.507-0.526 after
   25,200 env steps at seeds 0-2 in our runs, against 0.568-0.580 with four (over 8 seeds on another CPU, four
   still left one seed prompt-blind; 8 steps at lr 5e-4 did better at that length but not over 126,000 env
   steps: results/device/session28, docs/LM_CONTROLLERS.md). The learning rate decays with the
   env steps spent, and TRL's adaptive entropy bonus keeps the policy exploring: without it, the policy
   collapsed within 5,000 env steps onto one cheap configuration for every request and budget in our runs.
3. Every `eval_every_env_steps` the controller (greedy decoding, constrained to the knob tokens) is evaluated on
   the held-out requests (`agents.evaluation.evaluate`), with the unconstrained invalid-output rate, and a
   checkpoint is written (Hugging Face Trainer checkpoint: safetensors weights, optimizer and RNG states loaded
   back with `weights_only=True`; the env-step count and wall-clock travel in its `trainer_state.json`).
   `--resume RUN_DIR` continues from the last one: the trainer skips the batches it consumed, the env is
   re-seeded per step from the env-step count, so no env step is lost or repeated.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from agents.lm import LMController, format_warm_start

from .common import Run, check_number, eval_points
from .lm_args import LMArgs, log_lm_evaluation, start_lm_run


# TRL's GRPO losses (trl 1.16) that work with token-level importance sampling, which this trainer keeps (TRL's
# default); TRL's "luspo" needs sequence-level sampling.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo")


@dataclass
class Args(LMArgs):
    total_env_steps: int = 126_000
    """env steps (completions executed by the env) to train for"""
    eval_every_env_steps: int = 12_600
    """evaluate on the held-out requests (and checkpoint) every this many env steps"""
    learning_rate: float = 1e-3
    """AdamW learning rate (for a fresh model; to fine-tune an --init-from policy, 2.5e-4 did better: at 1e-3 GRPO
    undid part of a DPO policy, README "GRPO after DPO")"""
    lr_scheduler: str = "linear"
    """learning-rate schedule over the env-step budget (not optimizer steps): linear or cosine (decay to 0), or constant"""
    prompts_per_step: int = 8
    """prompts per optimizer step (each answered num_generations times)"""
    num_generations: int = 8
    """completions sampled per prompt (the GRPO group)"""
    temperature: float = 1.0
    """sampling temperature of the completions"""
    beta: float = 0.0
    """KL coefficient to the initial (warm-started) model (0: no reference model)"""
    entropy_coef: float = 0.02
    """entropy bonus coefficient (keeps the policy exploring); the initial one with entropy_target"""
    entropy_target: float | None = 0.8
    """adaptive entropy control (TRL's use_adaptive_entropy): raise the bonus while the mean per-token entropy is below this"""
    epsilon: float = 0.2
    """PPO-style clipping range of the importance ratio"""
    num_iterations: int = 4
    """optimizer steps on each generated batch (PPO-style reuse, clipped by epsilon; see the module docstring)"""
    loss_type: str = "dapo"
    """TRL GRPO loss: one of GRPO_LOSS_TYPES (grpo, bnpo, dr_grpo, dapo, cispo, sapo, vespo)"""
    scale_rewards: str = "group"
    """advantage scaling: group (per-prompt std), batch, or none"""
    invalid_penalty: float | None = None
    """reward of an invalid completion (None: -(1 + lam * (1.25 / min budget fraction - 1)) - 0.5, below any valid one)"""
    max_invalid_batches: int = 50
    """stop the run once this many generated batches in a row had no valid completion (0: never; see EnvReward)"""

    def validate(self) -> None:
        super().validate()
        for name in ("prompts_per_step", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if self.max_invalid_batches < 0:
            raise ValueError(f"--max-invalid-batches={self.max_invalid_batches!r} must be >= 0 (0: never stop on it)")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations={self.num_generations!r} must be >= 2 (GRPO compares completions of a prompt)")
        for name in ("learning_rate", "temperature", "epsilon"):
            check_number(name, getattr(self, name), above=0)
        for name in ("beta", "entropy_coef"):
            check_number(name, getattr(self, name), at_least=0)
        if self.entropy_target is not None:
            check_number("entropy_target", self.entropy_target, above=0)
        if self.invalid_penalty is not None:
            check_number("invalid_penalty", self.invalid_penalty)
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"--lr-scheduler={self.lr_scheduler!r}; allowed: linear, cosine, constant")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"--loss-type={self.loss_type!r}; allowed: {', '.join(GRPO_LOSS_TYPES)}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"--scale-rewards={self.scale_rewards!r}; allowed: group, batch, none")
        if self.batch_size > self.total_env_steps:
            raise ValueError(f"--total-env-steps={self.total_env_steps} is less than one batch "
                             f"(prompts_per_step x num_generations = {self.batch_size})")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    def penalty(self) -> float:
        """The invalid-completion reward. The default is below the reward of any valid configuration whose latency
        is within 1.25x the family's full-configuration median (the recorded residuals stay under 1.2x)."""
        if self.invalid_penalty is not None:
            return float(self.invalid_penalty)
        return -(1.0 + self.lam * max(0.0, 1.25 / min(self.budget_fractions) - 1.0)) - 0.5


class EnvReward:
    """GRPO's reward function: the env's reward of each valid completion, `penalty` for invalid ones.

    `invalid_batches` counts the generated batches in a row (one call each) that had no valid completion. Such
    a batch teaches nothing: every completion of a group gets the same penalty, so every advantage is zero,
    and the policy moves only by the entropy bonus (off while the entropy is above its target, under the
    adaptive control), which favours no answer. A policy that writes only invalid answers therefore stays so:
    one run of results/device/session29 did, at 7,484 of 126,000 env steps, and would have spun to TRL's
    optimizer-step bound (31,544 steps) without another env step.
    """

    __name__ = "env_reward"

    def __init__(self, env, controller: LMController, penalty: float, seed: int, env_steps: int = 0, progress=None):
        self.env, self.controller, self.penalty, self.seed = env, controller, penalty, seed
        self.env_steps = env_steps
        self.progress = progress
        self._actions = controller._actions
        self.invalid_batches = 0
        self.reset_window()

    def reset_window(self) -> None:
        self.window = {"completions": 0, "invalid": 0, "reward": 0.0, "quality": 0.0, "violation": 0}

    def __call__(self, prompts, completions, completion_ids, request_id, budget_fraction, **kwargs):
        rewards = []
        env_steps_before = self.env_steps
        for ids, rid, fraction in zip(completion_ids, request_id, budget_fraction):
            index = self.controller.parse(ids)
            self.window["completions"] += 1
            if index is None:
                self.window["invalid"] += 1
                rewards.append(self.penalty)
                continue
            # One seed per env step: the recorded-latency draw depends on the step count only, so a resumed run
            # draws what the uninterrupted one would have.
            self.env.reset(seed=self.seed * 1_000_003 + self.env_steps,
                           options={"request_id": rid, "budget_fraction": float(fraction)})
            _, reward, _, _, info = self.env.step(self._actions[index])
            self.env_steps += 1
            self.window["reward"] += float(reward)
            self.window["quality"] += float(info["quality"])
            self.window["violation"] += int(info["violation"])
            rewards.append(float(reward))
        self.invalid_batches = 0 if self.env_steps > env_steps_before else self.invalid_batches + 1
        if self.progress is not None:
            self.progress.update(self.env_steps - self.progress.n)
        return rewards

    def window_metrics(self) -> dict[str, float]:
        w = self.window
        valid = w["completions"] - w["invalid"]
        return {
            "completions": w["completions"],
            "invalid_rate": w["invalid"] / max(1, w["completions"]),
            "reward": w["reward"] / max(1, valid),
            "policy_reward": w["reward"] / max(1, valid),  # the name every sampling method logs it under
            "quality": w["quality"] / max(1, valid),
            "violation_rate": w["violation"] / max(1, valid),
        }


def make_callback(args: Args, run: Run, controller: LMController, reward: EnvReward, heldout, heldout_observations,
                  start_point: int):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class EnvStepCallback(TrainerCallback, ExportableState):
        """Stops at the env-step budget, evaluates at the eval points, checkpoints with the env-step count."""

        def __init__(self):
            self.points = eval_points(args.total_env_steps, args.eval_every_env_steps, start_point)
            self.trl_logs: dict[str, float] = {}
            self.logged_at = start_point  # env steps of the run's last curve line
            self.stopped = ""  # why the run ended short of its env-step budget, if it did

        def state(self) -> dict:
            return {"args": {}, "attributes": {"env_steps": reward.env_steps, "wall_clock_s": run.wall_clock_s,
                                               "stopped": self.stopped}}

        def stop(self, where: str, why: str) -> None:
            self.stopped = where
            print(f"grpo: stopped {where}, at {reward.env_steps} of {args.total_env_steps} env steps: {why}",
                  file=sys.stderr)

        def on_step_begin(self, _args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, reward.env_steps)

        def on_log(self, _args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.trl_logs[key.replace("/", "_")] = float(value)

        def on_save(self, trainer_args, state, control, **kwargs):
            # The Trainer also pickles its TrainingArguments into each checkpoint; resuming never reads that file,
            # and a run directory holds no pickle.
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            checkpoint = Path(trainer_args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            (checkpoint / "training_args.bin").unlink(missing_ok=True)
            run.checkpointed(reward.env_steps)
            return control

        def on_step_end(self, _args, state, control, **kwargs):
            # A generated batch is trained on for num_iterations optimizer steps: evaluate, checkpoint and stop
            # only once its last one is done, so no batch's env steps go half-used and a resumed run starts
            # with a fresh generation, as the uninterrupted one does.
            if state.global_step % args.num_iterations:
                return control
            done = reward.env_steps + args.batch_size > args.total_env_steps
            # TRL's optimizer-step bound (max_steps below) leaves room for three invalid completions in four;
            # a run whose policy writes more ends there, short of its env-step budget: evaluate it and say so
            at_step_bound = 0 < state.max_steps <= state.global_step
            if at_step_bound and not done:
                self.stop(f"at TRL's optimizer-step bound ({state.max_steps} steps)", "most completions (three in "
                          "four or more) were invalid (see train/invalid_rate in curves.jsonl)")
                done = True
            if 0 < args.max_invalid_batches <= reward.invalid_batches and not done:
                n = reward.invalid_batches
                self.stop(f"after {n} generated batches in a row ({n * args.batch_size} completions) without a valid "
                          "answer (--max-invalid-batches)", "every completion of a group got the same penalty, so "
                          "GRPO had nothing to learn from and the policy could not recover")
                done = True
            if (self.points and reward.env_steps >= self.points[0]) or done:
                while self.points and reward.env_steps >= self.points[0]:
                    self.points.pop(0)
                # one curve line per env-step count: a run that stops without an env step since its last line
                # adds none (its final.json still evaluates the final weights)
                if reward.env_steps > self.logged_at:
                    log_evaluation(args, run, controller, reward, heldout, heldout_observations,
                                   {**self.trl_logs, "optimizer_steps": state.global_step,
                                    "learning_rate": learning_rate(args, reward.env_steps)})
                    self.logged_at = reward.env_steps
                control.should_save = True
            if done:
                control.should_training_stop = True
            return control

    return EnvStepCallback()


def learning_rate(args: Args, env_steps: int) -> float:
    """The learning rate after `env_steps` of the budget (`--lr-scheduler`)."""
    progress = min(1.0, env_steps / args.total_env_steps)
    if args.lr_scheduler == "linear":
        return args.learning_rate * (1.0 - progress)
    if args.lr_scheduler == "cosine":
        return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.learning_rate


def log_evaluation(args, run, controller, reward, heldout, heldout_observations, extra=None):
    controller.model.eval()
    record = log_lm_evaluation(args, run, controller, heldout, heldout_observations, reward.env_steps,
                               {**reward.window_metrics(), **(extra or {})})
    reward.reset_window()
    controller.model.train()
    return record


def last_checkpoint(run: Run) -> tuple[Path | None, dict]:
    """The newest complete Trainer checkpoint of the run and its env-step state ((None, {}) if none).

    A checkpoint is complete once its `trainer_state.json` (written last, with the env-step count) exists; the
    Trainer removes the previous checkpoint only after that, so a crash mid-save leaves the previous one."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not run.checkpoint_dir.exists():
        return None, {}
    found = []
    for path in run.checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        saved = TrainerState.load_from_json(str(path / "trainer_state.json")).stateful_callbacks.get("EnvStepCallback")
        if saved:
            return path, saved["attributes"]
    return None, {}


def main(args: Args) -> dict:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    run, train_env, heldout, observations, request_ids, fractions, heldout_observations, controller = start_lm_run(args, "grpo")
    checkpoint, saved = (None, {})
    if args.resume is not None:
        checkpoint, saved = last_checkpoint(run)
    env_steps = int(saved.get("env_steps", 0))
    progress = tqdm(total=args.total_env_steps, desc="grpo", unit="env step", initial=env_steps)
    reward = EnvReward(train_env, controller, args.penalty(), args.seed, env_steps, progress)
    if checkpoint is not None:
        run.resumed_from(env_steps, float(saved["wall_clock_s"]))
    else:
        if args.resume is not None:
            run.resumed_from(-1, 0.0)  # no checkpoint yet: start over, dropping every curve line
        warm = format_warm_start(controller, observations, args.warmup_steps(), seed=args.seed)
        log_evaluation(args, run, controller, reward, heldout, heldout_observations, warm)

    if args.beta > 0:
        # TRL builds the KL reference from the model's path: the warm-started model, saved once per run.
        reference = run.dir / "reference_model"
        if not (reference / "config.json").exists():
            controller.model.save_pretrained(reference)
        controller.model.config._name_or_path = str(reference)

    texts = controller.render(observations)
    dataset = Dataset.from_dict({"prompt": texts, "request_id": request_ids, "budget_fraction": fractions})
    config = GRPOConfig(
        output_dir=str(run.checkpoint_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        seed=args.seed,
        data_seed=args.seed,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",  # the callback scales the learning rate by env-step progress
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=4,
        temperature=args.temperature,
        beta=args.beta,
        epsilon=args.epsilon,
        entropy_coef=args.entropy_coef,
        use_adaptive_entropy=args.entropy_target is not None,
        entropy_target=args.entropy_target if args.entropy_target is not None else 0.2,
        num_iterations=args.num_iterations,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        # an upper bound only: the env-step budget stops training (invalid completions take no env step);
        # each generated batch takes num_iterations optimizer steps
        max_steps=args.num_iterations * (4 * math.ceil(args.total_env_steps / args.batch_size) + 10),
        save_strategy="no",  # checkpoints are written at the eval points (the callback asks for them)
        save_total_limit=1,
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = make_callback(args, run, controller, reward, heldout, heldout_observations,
                             start_point=env_steps)
    trainer = GRPOTrainer(model=controller.model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=controller.tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if saved.get("stopped"):
        print(f"grpo: this run stopped {saved['stopped']} before; it is not trained further", file=sys.stderr)
    if reward.env_steps + args.batch_size <= args.total_env_steps and not saved.get("stopped"):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    elif checkpoint is not None:  # finished or stopped before: just restore the final weights
        from safetensors.torch import load_file

        controller.model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    progress.close()
    controller.model.eval()
    return run.finish(controller, None, heldout, reward.env_steps)
