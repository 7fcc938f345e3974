"""`flexvlm-demo`: answer a few procedural requests at several configurations, print stage latencies.

This is the README's main job until the environments and trainers exist: it shows the three knobs
acting on real requests (answers, scores, vision tokens, per-stage milliseconds) on the local device,
with the shipped `micro` weights by default. The families shown are ones where micro answers
correctly at the full configuration often enough to see the knobs act (its per-family quality is
in the README's model card).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flexvlm-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro", help="micro or molmoe-1b")
    parser.add_argument("--weights", default=None, help="checkpoint dir/hub id, or 'random' (default: the preset's shipped weights)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--requests", type=int, default=1, help="requests per task family")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = args.weights
    try:
        vlm = load_model(args.preset, weights=weights, device=args.device)
    except FileNotFoundError as err:
        if weights is not None:
            raise
        print(f"note: {err}\n      falling back to weights='random': the answers below are noise, the latencies are real.\n")
        vlm = load_model(args.preset, weights="random", device=args.device)
    from .metrics import score

    print(f"model {args.preset} on {vlm.device} ({str(vlm.dtype).replace('torch.', '')}), "
          f"{'random weights' if vlm.random_weights else 'weights ' + (vlm.weights_sha256 or '')[:12]}, block ranking: {vlm.ranking_source}")
    header = f"{'request':28s} {'config':>12s} {'vis':>4s} {'in':>4s} {'out':>3s} {'vision':>7s} {'proj':>6s} {'prefill':>8s} {'decode':>8s} {'total':>8s}  score  answer"
    print(header)
    print("-" * len(header))
    for family in FAMILIES:
        for sample in load_samples(family, "procedural", "val", n=args.requests, seed=0):
            for config in CONFIGS:
                result = vlm.generate(sample.image, sample.prompt, config, max_new_tokens=sample.max_new_tokens)
                lat = result.latency
                print(
                    f"{sample.request_id:28s} {str(config.as_tuple()):>12s} {result.tokens.vision:4d} {result.tokens.input:4d} "
                    f"{result.tokens.output:3d} {lat.vision_encoder_ms:7.1f} {lat.projector_ms:6.2f} {lat.prefill_ms:8.1f} "
                    f"{lat.decode_ms:8.1f} {lat.total_ms:8.1f}  {score(sample, result.text):.2f}  {result.text[:30]!r} (ref {sample.answers[0]!r})"
                )
    print("\ntimes in ms; config = (crops, top_k, active_blocks); vis/in/out = vision, input and output tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
