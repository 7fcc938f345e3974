"""Train the micro model's tokenizer on the text of the procedural task suite (train split).

Usage: python scripts/build_micro_tokenizer.py [--samples-per-family 600] [--vocab-size 1024]
Writes flexvlm_env/assets/micro/tokenizer.json (deterministic for fixed arguments).
"""
from __future__ import annotations

import tyro
from dataclasses import dataclass
from pathlib import Path

from flexvlm_env.model.runtime import assets_dir
from flexvlm_env.model.tokenizer import TextTokenizer, train_bpe_tokenizer
from flexvlm_env.tasks import FAMILIES, load_samples


@dataclass
class Args:
    samples_per_family: int = 600
    """train-split samples per family whose prompts, answers and options form the corpus"""
    vocab_size: int = 1024
    """BPE vocabulary size, special tokens included (must fit the micro preset's embedding_size)"""
    out: Path = assets_dir("micro") / "tokenizer.json"
    """where to write the tokenizer JSON"""


def corpus(samples_per_family: int):
    for family in FAMILIES:
        for sample in load_samples(family, "procedural", "train", n=samples_per_family, seed=0):
            yield " User: " + sample.prompt + " Assistant:"
            yield from (" " + answer for answer in sample.answers)
            yield from (" " + option for option in sample.options or ())


def main() -> None:
    args = tyro.cli(Args, description=__doc__.splitlines()[0])
    tokenizer = train_bpe_tokenizer(list(corpus(args.samples_per_family)), args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    wrapped = TextTokenizer(tokenizer)  # validates the special tokens
    example = wrapped.encode_prompt("How many red circles are there?")
    print(f"wrote {args.out}: vocab {wrapped.vocab_size}, example prompt -> {len(example)} tokens")


if __name__ == "__main__":
    main()
