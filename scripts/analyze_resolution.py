"""How large the decisive detail of each request is in the pixels a model's vision tower sees.

    python scripts/analyze_resolution.py --out results/resolution_at_full_crops.json

For each family, the decisive size recorded in `Sample.difficulty` (text height, object size, ...)
is scaled to the tiled canvas at a crop count (default 12, the full configuration: rows x cols
chosen by the exact rule, canvas = window * tiles + margins). A ViT patch is `patch_px` wide and a
vision token (after 2x2 pooling) covers twice that, so the ratio tells whether a preset can resolve
the detail at all. Compares the presets' crop geometries and a candidate one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tyro

from flexvlm_env.model.args import preset_args
from flexvlm_env.model.preprocess import select_tiling_exact, vision_token_count
from flexvlm_env.tasks import FAMILIES
from flexvlm_env.tasks.procedural import generate_samples

DECISIVE = ("text_height_px", "target_size_px", "object_size_px", "icon_size_px")


@dataclass
class Args:
    out: str = "results/resolution_at_full_crops.json"
    crops: int = 12
    requests_per_family: int = 200
    split: str = "val"
    candidate_crop_px: int = 224
    """crop size of the candidate micro geometry (same ViT, patch and margins)"""


def main(args: Args) -> None:
    micro = preset_args("micro").vision
    geometries = {"micro": micro, "molmoe-1b": preset_args("molmoe-1b").vision,
                  f"micro, {args.candidate_crop_px} px crops": replace(micro, crop_px=args.candidate_crop_px)}
    samples = {f: generate_samples(f, args.split, args.requests_per_family) for f in FAMILIES}
    result = {"crops": args.crops, "split": args.split, "requests_per_family": args.requests_per_family, "geometries": {}}
    for name, vision in geometries.items():
        rows = {}
        for family, items in samples.items():
            sizes = []
            for s in items:
                key = next((k for k in DECISIVE if k in (s.difficulty or {})), None)
                if key is None:
                    continue
                r, c = select_tiling_exact(s.image.height, s.image.width, args.crops, vision)
                canvas_h, canvas_w = vision.canvas_px(r, c)
                scale = min(canvas_h / s.image.height, canvas_w / s.image.width)
                sizes.append(s.difficulty[key] * scale)
            if sizes:
                rows[family] = {"decisive": key, "p10_px": float(np.percentile(sizes, 10)), "median_px": float(np.median(sizes))}
        result["geometries"][name] = {"crop_px": vision.crop_px, "patch_px": vision.patch_px, "token_px": vision.patch_px * vision.pool,
                                      "vision_tokens_3x4": vision_token_count(3, 4, vision), "families": rows}
        print(f"{name}: crop {vision.crop_px} px, {vision_token_count(3, 4, vision)} vision tokens at 3x4; median px in canvas: "
              + ", ".join(f"{f} {v['median_px']:.0f}" for f, v in rows.items()))
    result["args"] = asdict(args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
