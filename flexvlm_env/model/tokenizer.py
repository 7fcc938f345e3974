"""Text side of a request: the prompt template, the tokenizer and the special token ids.

Both presets use a Hugging Face `tokenizers` JSON file: `molmoe-1b` the checkpoint's own (GPT-NeoX
style BPE, read from the checkpoint directory), `micro` a small BPE trained by
`scripts/build_micro_tokenizer.py` that ships with its weights. The prompt is wrapped as MolmoE
does (`" User: " + prompt + " Assistant:"`) and end-of-text doubles as BOS and EOS.
"""
from __future__ import annotations

import gzip
from pathlib import Path

from tokenizers import Tokenizer

from .preprocess import SpecialTokens

SPECIAL_NAMES = {
    "eos": "<|endoftext|>",
    "pad": "<|padding|>",
    "im_start": "<im_start>",
    "im_end": "<im_end>",
    "im_patch": "<im_patch>",
    "im_col": "<im_col>",
}


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus MolmoE's prompt template and special ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        for key, token in SPECIAL_NAMES.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer has no {token!r} token; it is not a Molmo-style tokenizer")
            ids[key] = token_id
        self.special = SpecialTokens(bos=ids["eos"], **ids)

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if path.is_dir():
            candidates = [path / "tokenizer.json", path / "tokenizer.json.gz"]
            found = [p for p in candidates if p.exists()]
            if not found:
                raise FileNotFoundError(f"no tokenizer.json or tokenizer.json.gz in {path}")
            path = found[0]
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return cls(Tokenizer.from_str(handle.read()))
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        return self.tokenizer.encode(" User: " + prompt + " Assistant:", add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def train_bpe_tokenizer(texts, vocab_size: int = 1024) -> Tokenizer:
    """A small byte-level BPE for the micro model, with MolmoE's special tokens.

    Digits are split one by one so that counts, prices and codes are spelled out digit by digit
    (reading tasks must copy strings the model has never seen as a whole); byte-level fallback means
    no input is ever out of vocabulary.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [SPECIAL_NAMES[k] for k in ("eos", "pad", "im_start", "im_end", "im_patch", "im_col")] + ["<|image|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
