"""Build the CIDEr-D document-frequency table that scores procedural caption rewards.

Generates the procedural `coco_caption` training split (5000 images by default), counts in how many
images' references each 1..4-gram occurs (after the same PTB tokenisation the scorer applies), and
writes the table as gzipped JSON to `flexvlm_env/assets/cider_df_procedural.json.gz`, where
`flexvlm_env.metrics.get_cider_df("procedural")` finds it. The output is a pure function of the
arguments: rerunning reproduces the shipped file byte for byte.

    python scripts/build_cider_df.py [--n 5000] [--seed 0] [--out PATH]
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from flexvlm_env.metrics.caption import PROCEDURAL_ASSET, build_cider_df
from flexvlm_env.tasks import load_samples


@dataclass
class Args:
    n: int = 5000
    """number of training images whose references are counted"""
    seed: int = 0
    """procedural generator seed"""
    out: Path = PROCEDURAL_ASSET
    """output path (.json or .json.gz)"""


def main(argv: list[str] | None = None) -> Path:
    args = tyro.cli(Args, args=argv, description=__doc__.splitlines()[0])

    start_s = time.perf_counter()
    samples = load_samples("coco_caption", "procedural", "train", n=args.n, seed=args.seed)
    stats = build_cider_df([sample.answers for sample in samples])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(args.out)
    print(
        f"wrote {args.out}: {stats.num_documents} images, {len(stats.document_frequency)} n-grams, "
        f"{args.out.stat().st_size / 1024:.1f} KiB in {time.perf_counter() - start_s:.1f} s"
    )
    return args.out


if __name__ == "__main__":
    main()
