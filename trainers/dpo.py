"""`flexvlm-train dpo`: a tiny causal LM that writes the configuration, trained with TRL's `DPOTrainer`.

The policy is `agents.lm.LMController`'s model (see `trainers/grpo.py` and `agents/lm.py`): it reads a text
rendering of an observation and writes ``crops=C top_k=K active_blocks=A<eos>``.

1. Format warm start (`agents.lm.format_warm_start`): next-token steps on uniformly random configurations, so the
   random model writes well-formed answers; it learns no preference (labels ignore the prompt; no env step).
   `--init-from` starts from a saved LM controller instead, without it.
2. Rounds of iterative (online) DPO until the env-step budget is spent. Each round:
   - draws (request, budget fraction) pairs from the train-split pool until the round's `round_env_steps` are
     spent; for each, `candidates` configurations: `candidates - random_candidates` sampled from the current
     policy (unconstrained, temperature `temperature`, so it may write invalid answers) and `random_candidates`
     uniform over the grid (exploration); the env executes each valid one with the request and budget pinned
     (`env.reset(options=...)`, `env.step`): one env step each. An invalid answer is penalised: it ranks below
     every valid one (so it is a rejected answer) and takes no env step;
   - prefers the best-rewarded candidate over every worse one (`--no-all-pairs`: over the worst only; ties
     give no pair) and trains with `trl.DPOTrainer` / `trl.DPOConfig` (unmodified) on the round's pairs; the
     reference model is the policy at the round's start, and an SFT term on the chosen answers (TRL's "sft"
     loss, `sft_weight`) keeps DPO from pushing probability onto invalid answers (without it, over half of the
     policy's sampled answers were invalid after two rounds in our runs). The learning rate decays over the budget.
   `--pairs profiles` takes the preferences from the recorded train-half profiles instead (`ProfiledPairs`:
   requests profiled in a seeded order at every configuration, which is what their env steps count; the best
   expected-reward configuration is preferred over worse candidates). It learns less well than env comparisons.
3. At the eval points (every `eval_every_env_steps`) the controller (greedy, constrained to the knob tokens) is
   evaluated on the held-out requests, with the unconstrained invalid-output rate. A checkpoint is written after
   every round (`flexvlm_env.training.state`: safetensors + JSON). Each round's draws are seeded by the round
   index and the env by the env-step count, so `--resume RUN_DIR` repeats nothing and loses nothing.
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from agents.lm import LMController, format_warm_start, render_config
from flexvlm_env.training.state import load_training_state, save_training_state

from .common import Run, check_number, eval_points
from .lm_args import LMArgs, log_lm_evaluation, start_lm_run


@dataclass
class Args(LMArgs):
    total_env_steps: int = 126_000
    """env steps (candidate configurations executed by the env) to train for"""
    eval_every_env_steps: int = 12_600
    """evaluate on the held-out requests every this many env steps"""
    pairs: str = "env"
    """where preferences come from: env (candidates executed by the train-split env) or profiles (the recorded
    train-half profiles, read request by request in a seeded order, each costing one env step per grid config)"""
    round_env_steps: int = 6_300
    """env steps collected per DPO round (each round then trains on its own preference pairs)"""
    candidates: int = 4
    """configurations compared per (request, budget): the best is preferred over the others (see --all-pairs)"""
    random_candidates: int = 2
    """of those, drawn uniformly from the grid (the rest are sampled from the current policy)"""
    all_pairs: bool = True
    """prefer the best candidate over every worse one (False: over the worst only)"""
    temperature: float = 1.0
    """sampling temperature of the policy's candidates"""
    beta: float = 0.1
    """DPO beta (strength of the pull towards the round's reference policy)"""
    sft_weight: float = 1.0
    """weight of an added SFT loss on the chosen answers (TRL loss_type "sft"; 0: plain DPO)"""
    learning_rate: float = 1e-3
    """AdamW learning rate (constant within a round)"""
    lr_decay: bool = True
    """decay the rounds' learning rate linearly over the env-step budget (to 5% at the end)"""
    epochs_per_round: int = 2
    """passes over a round's preference pairs"""
    pairs_per_batch: int = 32
    """preference pairs per optimizer step"""

    def validate(self) -> None:
        super().validate()
        for name in ("round_env_steps", "epochs_per_round", "pairs_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if self.candidates < 2:
            raise ValueError(f"--candidates={self.candidates!r} must be >= 2 (a preference needs two configurations)")
        if not 0 <= self.random_candidates <= self.candidates:
            raise ValueError(f"--random-candidates={self.random_candidates!r} must be in 0..candidates={self.candidates}")
        if self.round_env_steps < self.candidates:
            raise ValueError(f"--round-env-steps={self.round_env_steps} must be >= --candidates={self.candidates}")
        if self.total_env_steps < self.candidates:
            raise ValueError(f"--total-env-steps={self.total_env_steps} must be >= --candidates={self.candidates}")
        for name in ("learning_rate", "temperature", "beta"):
            check_number(name, getattr(self, name), above=0)
        if self.pairs not in ("env", "profiles"):
            raise ValueError(f"--pairs={self.pairs!r}; allowed: env, profiles")
        if self.pairs == "profiles" and self.env != "FlexVLMReplay-v0":
            raise ValueError("--pairs profiles needs the recorded profiles: use --env FlexVLMReplay-v0")
        if self.pairs == "profiles" and min(self.round_env_steps, self.total_env_steps) < 140:
            raise ValueError(f"--round-env-steps={self.round_env_steps} and --total-env-steps={self.total_env_steps} "
                             "must be >= 140 with --pairs profiles (profiling one request executes every configuration)")
        check_number("sft_weight", self.sft_weight, at_least=0)


def answer_text(controller: LMController, answer: np.ndarray, index: int) -> str:
    """A candidate as DPO's completion text (leading space: it follows the prompt's last word)."""
    if index >= 0:
        return " " + render_config(int(index), controller.grid)
    tokens = []
    for token in answer.tolist():  # the invalid answer as written, up to its <eos>
        tokens.append(controller.vocabulary.tokens[token])
        if token == controller.vocabulary.eos_id:
            break
    return " " + " ".join(tokens)


def collect_pairs(args: Args, controller: LMController, env, observations, request_ids, fractions, n_contexts: int,
                  round_index: int, draw: int, env_steps: int, progress=None) -> tuple[list[dict], dict, int]:
    """Preference pairs (prompt, chosen, rejected) from `n_contexts` drawn (request, budget) pairs, their
    statistics and the env-step count after them."""
    rng = np.random.default_rng([args.seed, round_index, draw])
    rows = rng.integers(0, len(request_ids), n_contexts)
    batch = {key: value[rows] for key, value in observations.items()}
    n_policy = args.candidates - args.random_candidates
    answers, index = sample_candidates(args, controller, batch, n_contexts, rng)
    prompts = controller.render(batch)
    actions = controller._actions
    pairs, rewards_seen, policy_rewards = [], [], []
    stats = {"contexts": n_contexts, "invalid": 0, "policy_candidates": n_contexts * n_policy, "ties": 0, "violations": 0}
    for c in range(n_contexts):
        rewards = np.full(args.candidates, -np.inf)
        request_id, fraction = request_ids[rows[c]], fractions[rows[c]]
        for j in range(args.candidates):
            if index[c, j] < 0:
                stats["invalid"] += 1
                continue
            env.reset(seed=args.seed * 1_000_003 + env_steps, options={"request_id": request_id, "budget_fraction": fraction})
            _, reward, _, _, info = env.step(actions[index[c, j]])
            env_steps += 1
            rewards[j] = reward
            rewards_seen.append(reward)
            if j < n_policy:
                policy_rewards.append(reward)
            stats["violations"] += int(info["violation"])
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] == rewards[worst]:
            stats["ties"] += 1
            continue
        chosen = answer_text(controller, answers[c, best], index[c, best])
        losers = [j for j in range(args.candidates) if rewards[j] < rewards[best]] if args.all_pairs else [worst]
        for j in losers:
            pairs.append({"prompt": prompts[c], "chosen": chosen, "rejected": answer_text(controller, answers[c, j], index[c, j])})
        if progress is not None:
            progress.update(env_steps - progress.n)
    metrics = {
        "contexts": n_contexts,
        "pairs": len(pairs),
        "tie_rate": stats["ties"] / max(1, n_contexts),
        "invalid_rate": stats["invalid"] / max(1, stats["policy_candidates"]),
        "candidate_reward": float(np.mean(rewards_seen)) if rewards_seen else float("nan"),
        # the methods' common training-reward curve (PPO's rollouts, GRPO's valid completions): the policy's samples
        "policy_reward": float(np.mean(policy_rewards)) if policy_rewards else float("nan"),
        "candidate_violation_rate": stats["violations"] / max(1, len(rewards_seen)),
    }
    return pairs, metrics, env_steps


class ProfiledPairs:
    """Preference pairs from the recorded train-half profiles (`--pairs profiles`).

    Requests are profiled in a seeded order (as `flexvlm-train lut` does), each at every configuration: that is
    `len(grid)` env steps per request. For a profiled request and a budget fraction the expected reward of every
    configuration is known (its quality minus the mean overshoot penalty over the recorded latency residuals), so
    the best configuration is preferred over each worse candidate (sampled from the policy, or uniformly)."""

    def __init__(self, args: Args, env):
        from .common import load_profiles

        self.profiles = load_profiles(args)
        self.n_configs = len(self.profiles.grid)
        self.order = np.random.default_rng(args.seed).permutation(self.profiles.n_requests)
        pool = list(env.unwrapped.request_ids)  # `pool_observations` rows: fraction-major over this pool
        pool_index = {rid: i for i, rid in enumerate(pool)}
        self.pool_rows = np.array([pool_index[rid] for rid in self.profiles.request_ids])  # profile row -> pool row
        n_pool = len(pool)
        reward_fn = env.unwrapped.reward_fn
        latency = self.profiles.latency_ms[:, :, None] * self.profiles.noise_factor[None]  # [R, C, M]
        self.expected = np.stack([  # [F, R, C]
            reward_fn(self.profiles.quality[:, :, None], latency,
                      (fraction * self.profiles.reference_ms)[:, None, None]).mean(axis=2)
            for fraction in args.budget_fractions])
        self.n_pool = n_pool

    def budget(self, total_env_steps: int) -> int:
        return min(total_env_steps, self.profiles.n_profiled)

    def collect(self, args: Args, controller: LMController, observations, target: int, round_index: int):
        n_requests = target // self.n_configs
        rng = np.random.default_rng([args.seed, round_index])
        profiled = self.order[:n_requests]
        n_contexts = min(len(profiled) * len(args.budget_fractions), args.round_env_steps // args.candidates)
        contexts = rng.choice(len(profiled) * len(args.budget_fractions), n_contexts, replace=False)
        fraction_index, rows = contexts // len(profiled), profiled[contexts % len(profiled)]
        batch = {key: value[fraction_index * self.n_pool + self.pool_rows[rows]] for key, value in observations.items()}
        answers, index = sample_candidates(args, controller, batch, n_contexts, rng)
        expected = self.expected[fraction_index, rows]  # [n, C]
        best = np.argmax(expected, axis=1)
        prompts = controller.render(batch)
        pairs, invalid = [], 0
        for c in range(n_contexts):
            chosen = answer_text(controller, answers[c, 0], best[c])
            for j in range(args.candidates):
                invalid += int(index[c, j] < 0)
                if index[c, j] < 0 or expected[c, index[c, j]] < expected[c, best[c]]:
                    pairs.append({"prompt": prompts[c], "chosen": chosen,
                                  "rejected": answer_text(controller, answers[c, j], index[c, j])})
        n_policy = n_contexts * (args.candidates - args.random_candidates)
        metrics = {"contexts": n_contexts, "pairs": len(pairs), "profiled_requests": n_requests,
                   "invalid_rate": invalid / max(1, n_policy)}
        return pairs, metrics, n_requests * self.n_configs


def sample_candidates(args: Args, controller: LMController, batch, n_contexts: int, rng):
    """`candidates` answers per context: token ids [n, k, 4] and config indices [n, k] (-1: invalid); the first
    `candidates - random_candidates` sampled from the policy (unconstrained), the rest uniform over the grid."""
    n_policy = args.candidates - args.random_candidates
    answers = np.zeros((n_contexts, args.candidates, 4), dtype=np.int64)
    index = np.zeros((n_contexts, args.candidates), dtype=np.int64)
    if n_policy:
        repeated = {key: np.repeat(value, n_policy, axis=0) for key, value in batch.items()}
        sampled = controller.generate(repeated, constrained=False, temperature=args.temperature, rng=rng)
        answers[:, :n_policy] = sampled.reshape(n_contexts, n_policy, -1)
        index[:, :n_policy] = controller.answers_to_indices(sampled).reshape(n_contexts, n_policy)
    index[:, n_policy:] = rng.integers(0, len(controller.grid), (n_contexts, args.random_candidates))
    return answers, index


def train_round(args: Args, run: Run, controller: LMController, pairs: list[dict], round_index: int,
                learning_rate: float) -> dict:
    """DPO on one round's pairs (TRL's DPOTrainer; the reference is a copy of the policy as it is now)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    loss_type, loss_weights = ["sigmoid"], None
    if args.sft_weight > 0:
        loss_type, loss_weights = ["sigmoid", "sft"], [1.0, args.sft_weight]
    config = DPOConfig(
        output_dir=str(run.dir / "dpo_round"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        seed=args.seed + round_index,
        data_seed=args.seed + round_index,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=args.pairs_per_batch,
        num_train_epochs=args.epochs_per_round,
        beta=args.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        max_length=64,
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    logs: dict[str, float] = {}

    class KeepLogs(TrainerCallback):
        """Keeps the round's last logged DPO metrics (loss, reward accuracy and margin, ...)."""

        def on_log(self, _args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    kept[key.replace("/", "_")] = float(value)

    kept = logs
    reference = copy.deepcopy(controller.model).eval()  # the policy at the round's start
    trainer = DPOTrainer(model=controller.model, ref_model=reference, args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=controller.tokenizer, callbacks=[KeepLogs()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no")
    controller.model.eval()
    return logs


def main(args: Args) -> dict:
    run, train_env, heldout, observations, request_ids, fractions, heldout_observations, controller = start_lm_run(args, "dpo")
    env_steps, round_index = 0, 0
    state_file = run.checkpoint_dir / "state.json"
    if args.resume is not None and state_file.exists():
        progress_state = load_training_state(run.checkpoint_dir, controller.model, None)
        env_steps, round_index = int(progress_state["env_steps"]), int(progress_state["round"])
        run.resumed_from(env_steps, float(progress_state["wall_clock_s"]))
        window = dict(progress_state.get("window", {}))
    else:
        if args.resume is not None:
            run.resumed_from(-1, 0.0)  # no checkpoint yet: start over, dropping every curve line
        warm = format_warm_start(controller, observations, args.warmup_steps(), seed=args.seed)
        log_lm_evaluation(args, run, controller, heldout, heldout_observations, 0, warm)
        window = {}
    controller.model.eval()
    profiled = ProfiledPairs(args, train_env) if args.pairs == "profiles" else None
    total = profiled.budget(args.total_env_steps) if profiled else args.total_env_steps
    step = profiled.n_configs if profiled else args.candidates  # the fewest env steps that yield pairs
    points = eval_points(total, args.eval_every_env_steps, env_steps)
    progress = tqdm(total=total, desc="dpo", unit="env step", initial=env_steps)
    while total - env_steps >= step:
        # One round: contexts until the round's env steps are spent (invalid candidates take none, so a round
        # may need several draws); then DPO on the round's pairs.
        # rounds end at multiples of round_env_steps (a round ends up to candidates-1 steps short of its target)
        target = min(((env_steps + step - 1) // args.round_env_steps + 1) * args.round_env_steps, total)
        pairs, window_round, draw = [], {}, 0
        start = env_steps
        if profiled:
            pairs, metrics, env_steps = profiled.collect(args, controller, observations, target, round_index)
            window_round = {key: [value] for key, value in metrics.items()}
        while not profiled and target - env_steps >= args.candidates:
            before = env_steps
            new_pairs, metrics, env_steps = collect_pairs(
                args, controller, train_env, observations, request_ids, fractions,
                (target - env_steps) // args.candidates, round_index, draw, env_steps, progress)
            pairs += new_pairs
            for key, value in metrics.items():
                window_round.setdefault(key, []).append(value)
            draw += 1
            if env_steps == before:  # every candidate invalid (no random ones): the env was not asked
                break
        if env_steps == start:
            print("dpo: the policy wrote only invalid answers and no random candidates are drawn; stopping")
            break
        metrics = {key: float(np.sum(v)) if key in ("pairs", "contexts") else float(np.mean(v)) for key, v in window_round.items()}
        progress.update(env_steps - progress.n)
        if pairs:
            fraction_left = 1.0 - (env_steps - args.round_env_steps / 2) / total
            learning_rate = args.learning_rate * (max(0.05, min(1.0, fraction_left)) if args.lr_decay else 1.0)
            metrics.update(train_round(args, run, controller, pairs, round_index, learning_rate))
            metrics["learning_rate"] = learning_rate
        round_index += 1
        for key, value in metrics.items():  # averaged over the rounds since the last evaluation
            window.setdefault(key, []).append(value)
        last = total - env_steps < step
        # a round ends up to step-1 env steps short of its target: such a round reaches the point
        if (points and env_steps + step > points[0]) or last:
            while points and env_steps + step > points[0]:
                points.pop(0)
            summary = {k: float(np.nanmean(v)) for k, v in window.items()}
            log_lm_evaluation(args, run, controller, heldout, heldout_observations, env_steps, {**summary, "rounds": round_index})
            window = {}
        save_training_state(run.checkpoint_dir, controller.model, None,
                            {"env_steps": env_steps, "round": round_index, "wall_clock_s": run.wall_clock_s,
                             "window": window})
        run.checkpointed(env_steps)
    progress.close()
    controller.model.eval()
    return run.finish(controller, None, heldout, env_steps)
