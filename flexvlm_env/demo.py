"""`flexvlm-demo`: answer a few procedural requests at several configurations, then run an episode.

A first look at the model (the README's main job is `flexvlm-train maskable_ppo`). First it shows the three knobs acting on real requests (answers, scores,
vision tokens, per-stage milliseconds) on the local device, with the shipped `micro` weights by
default; then it plays one short `FlexVLM-v0` episode with the same model (random configurations,
so the budget, overshoot and reward of each step are visible). The families shown are ones where
micro answers correctly at the full configuration often enough to see the knobs act (its
per-family quality is in the README's model card).
"""
from __future__ import annotations

import argparse
import sys

import torch

from .config import Config
from .model.runtime import load_model
from .tasks import load_samples

CONFIGS = (
    Config(crops=12, top_k=8, active_blocks=16),
    Config(crops=4, top_k=4, active_blocks=12),
    Config(crops=1, top_k=1, active_blocks=8),
)
FAMILIES = ("okvqa", "coco_2014_vqa", "tally_qa", "coco_caption")
PRESETS = ("micro", "molmoe-1b")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flexvlm-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro", choices=PRESETS, help="model preset")
    parser.add_argument("--weights", default=None,
                        help="checkpoint dir/hub id, or 'random' (default: micro's shipped weights; molmoe-1b has none, "
                             "so random weights: real latencies, noise answers)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--requests", type=int, default=1, help="requests per task family (>= 1)")
    parser.add_argument("--episode-steps", type=int, default=6, help="steps of the FlexVLM-v0 episode (0: none)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests={args.requests} must be >= 1")
    if args.episode_steps < 0:
        parser.error(f"--episode-steps={args.episode_steps} must be >= 0 (0: no episode)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = args.weights
    if weights is None and args.preset != "micro":
        print(f"note: {args.preset} has no shipped weights; using weights='random': the answers below are noise, "
              "the latencies are real.\n")
        weights = "random"
    try:
        vlm = load_model(args.preset, weights=weights, device=args.device)
    except FileNotFoundError as err:
        if weights is not None:
            parser.error(f"--weights={weights}: {err}")
        print(f"note: {err}\n      falling back to weights='random': the answers below are noise, the latencies are real.\n")
        vlm = load_model(args.preset, weights="random", device=args.device)
    except ValueError as err:  # a bad device, or weights that are not a checkpoint of this preset
        parser.error(str(err))
    from .metrics import score

    print(f"model {args.preset} on {vlm.device} ({str(vlm.dtype).replace('torch.', '')}), "
          f"{'random weights' if vlm.random_weights else 'weights ' + (vlm.weights_sha256 or '')[:12]}, block ranking: {vlm.ranking_source}")
    header = f"{'request':32s} {'config':>12s} {'vis':>4s} {'in':>4s} {'out':>3s} {'vision':>7s} {'proj':>6s} {'prefill':>8s} {'decode':>8s} {'total':>8s}  score  answer"
    print(header)
    print("-" * len(header))
    for family in FAMILIES:
        for sample in load_samples(family, "procedural", "val", n=args.requests, seed=0):
            for config in CONFIGS:
                result = vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens)
                lat = result.latency
                print(
                    f"{sample.request_id:32s} {str(config.as_tuple()):>12s} {result.tokens.vision:4d} {result.tokens.input:4d} "
                    f"{result.tokens.output:3d} {lat.vision_encoder_ms:7.1f} {lat.projector_ms:6.2f} {lat.prefill_ms:8.1f} "
                    f"{lat.decode_ms:8.1f} {lat.total_ms:8.1f}  {score(sample, result.text):.2f}  {result.text[:30]!r} (ref {sample.answers[0]!r})"
                )
    print("\ntimes in ms; config = (crops, top_k, active_blocks); vis/in/out = vision, input and output tokens")
    if args.episode_steps > 0:
        run_episode(vlm, args.episode_steps)
    return 0


def run_episode(vlm, steps: int) -> None:
    """One FlexVLM-v0 episode with random configurations (what an agent's loop looks like)."""
    import gymnasium as gym  # the ids were registered when flexvlm_env was imported

    print(f"\nFlexVLM-v0 on {vlm.device}: calibrating budgets (full-configuration latency per family) ...")
    env = gym.make("FlexVLM-v0", vlm=vlm, families=list(FAMILIES), requests_per_family=4, episode_length=steps)
    observation, info = env.reset(seed=0)
    header = f"{'request':30s} {'budget ms':>9s} {'config':>12s} {'latency ms':>10s} {'quality':>7s} {'reward':>7s}"
    print(header)
    print("-" * len(header))
    env.action_space.seed(0)
    terminated = False
    while not terminated:
        budget_ms = float(observation["budget_ms"][0])
        observation, reward, terminated, _, info = env.step(env.action_space.sample())
        config = info["config"]
        print(f"{info['request_id']:30s} {budget_ms:9.1f} {str((config['crops'], config['top_k'], config['active_blocks'])):>12s} "
              f"{info['latency_ms']:10.1f} {info['quality']:7.2f} {reward:7.2f}" + ("  over budget" if info["violation"] else ""))
    print("reward = quality - max(0, latency - budget) / budget; see `help(flexvlm_env.envs.FlexVLMEnv)`")


if __name__ == "__main__":
    sys.exit(main())
