"""`transcribe`: a training-only task that teaches micro to read, before it must read in clutter.

The three reading families (text_vqa, st_qa, doc_qa) ask the model to find text among clutter,
pick one item by colour or label, and read it, often at 8-14 px. Trained on them alone, micro's
answer loss on them never left the text-only prior (7 000 mixed steps; 1 200 more at 224 px crops
with the reading families up-weighted at the full configuration: results/train_micro_log.jsonl,
BENCHMARKS.md). A dedicated reader with micro's own ViT does learn letters at 14-28 px
(scripts/reading_probe.py). This task is the short path between the two, the "large, clean text
first" curriculum: one word, code or number on a plain canvas, 12-48 px, and the question "What is
written in the image?" with the text itself as the answer (lower case, as the reading families'
references are). It is not an evaluation family: it exists only in training batches
(`TrainBatchSpec(families=(..., "transcribe"))`) and draws from its own seeded stream.

Measured on 2 x H200 (docs/MICRO.md, the 224 px round): 2 000 full-configuration steps with this task as
37.5% of the batches taught micro the answers' form but not what is written; its answers do not
depend on the image (scripts/reading_check.py). The second half of this module is therefore the
step before: reading pretraining of the vision tower alone on single crops of the same kind of
text (`reading_crop`, `ReadingCropStream`, `ReadingHead`; scripts/pretrain_reader.py). With the
tower pretrained so, micro's text_vqa and transcribe answers came to depend on the image (4 x H200,
docs/MICRO.md: the reading round).
"""
from __future__ import annotations

import functools
import hashlib
import string

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..tasks.procedural.documents import answer_vocabulary
from ..tasks.procedural.layout import sample_image_size
from ..tasks.procedural.render import draw_text, fitting_text_patch, jitter_rgb, paste_patch, text_ink_size, text_on
from ..tasks.procedural.scene import new_background
from ..tasks.procedural.vocab import CASES, COLOURS_RGB, SCENE_WORDS, styled
from ..tasks.sample import Sample
from .loop import StepStream

TRANSCRIBE = "transcribe"
TRAINING_ONLY_FAMILIES = (TRANSCRIBE,)
PROMPT = "What is written in the image?"
FONT_SIZES_PX = (12, 48)  # inclusive range of the requested font size (shrunk to fit narrow images)


@functools.lru_cache(maxsize=1)
def _document_values() -> tuple[str, ...]:
    return tuple(answer_vocabulary())


def _text(rng: np.random.Generator) -> tuple[str, str]:
    """(printed text, answer): a scene word in a random case, random letters, a code of letters
    and digits, as the scene families print them, or a value as doc_qa's documents print it (an
    amount, an ISO date, an invoice number, a count or a name). Documents came in after the first
    224 px round: doc_qa's loss stayed at its prior (1.04 nats) through 5 800 steps while text_vqa's
    fell from 2.0 to 1.3, and no transcribed text had the '.' and '-' of its amounts and dates."""
    kind = rng.random()
    if kind < 0.4:
        word = SCENE_WORDS[int(rng.integers(len(SCENE_WORDS)))]
        return styled(word, CASES[int(rng.integers(len(CASES)))]), word
    if kind < 0.75:
        length = int(rng.integers(2, 7))
        alphabet = string.ascii_uppercase if kind < 0.6 else string.ascii_uppercase + string.digits
        text = "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=length))
        return text, text.lower()
    values = _document_values()
    value = values[int(rng.integers(len(values)))]
    return value, value  # as documents print it: digits, '.', '-', lower-case names


def _rng(stream: str, index: int, seed: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"flexvlm-training/{stream}/{index}/{seed}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def transcribe_sample(index: int, seed: int = 0) -> Sample:
    """Training sample `index` of the transcribe task for `seed` (a pure function of both)."""
    rng = _rng(TRANSCRIBE, index, seed)
    size_wh = sample_image_size(rng)
    image, _ = new_background(rng, size_wh)
    printed, answer = _text(rng)
    if rng.random() < 0.5:  # on a coloured plate, as signs are
        names = tuple(COLOURS_RGB)
        plate = jitter_rgb(rng, COLOURS_RGB[names[int(rng.integers(len(names)))]], amount=10)
        ink, background = text_on(plate), plate
    else:
        ink, background = tuple(int(v) for v in rng.integers(0, 90, size=3)), None  # dark ink, pale canvas
    font_px = int(rng.integers(FONT_SIZES_PX[0], FONT_SIZES_PX[1] + 1))
    patch, font_px = fitting_text_patch(printed, font_px, (size_wh[0] - 8, size_wh[1] - 8), ink, background=background)
    x = int(rng.integers(4, max(5, size_wh[0] - patch.width - 3)))
    y = int(rng.integers(4, max(5, size_wh[1] - patch.height - 3)))
    paste_patch(image, patch, (x, y))
    return Sample(
        request_id=f"{TRANSCRIBE}/training/train/{index}",
        image=image,
        prompt=PROMPT,
        answers=(answer,),
        family=TRANSCRIBE,
        metric="exact_match",
        max_new_tokens=16,
        difficulty={"font_size_px": font_px, "image_width_px": size_wh[0], "image_height_px": size_wh[1]},
    )


@functools.lru_cache(maxsize=None)  # called for every rendered image; the search measures up to 4h glyph boxes
def font_size_for_height(height_px: int) -> int:
    """The font size whose capital letters' ink is closest to `height_px` tall."""
    return min(range(4, 4 * height_px), key=lambda size: abs(text_ink_size("HXE", size)[1] - height_px))


def render_text_crop(text: str, height_px: int, crop_px: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [crop, crop, 3]: `text` with capitals `height_px` tall (smaller if it would not fit
    the width), at a random place, on a noisy background of a random colour, in a contrasting
    random colour: one crop as the vision tower sees it."""
    background = rng.integers(0, 256, 3)
    ink = np.where(background.mean() > 127, rng.integers(0, 90, 3), rng.integers(165, 256, 3))
    image = Image.new("RGB", (crop_px, crop_px), tuple(int(c) for c in background))
    size = font_size_for_height(height_px)
    while size > 6 and text_ink_size(text, size)[0] > crop_px - 2:
        size -= 1
    width, height = text_ink_size(text, size)
    x = int(rng.integers(0, max(1, crop_px - width)))
    y = int(rng.integers(0, max(1, crop_px - height)))
    draw_text(ImageDraw.Draw(image), text, (x, y), size, tuple(int(c) for c in ink))
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (crop_px, crop_px, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def reading_crop(index: int, seed: int, crop_px: int, heights_px: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Crop `index` of the vision tower's reading pretraining: (uint8 [crop, crop, 3], answer),
    the transcribe task's texts at a capital height drawn from `heights_px` (inclusive)."""
    rng = _rng("reading-crop", index, seed)
    printed, answer = _text(rng)
    height_px = int(rng.integers(heights_px[0], heights_px[1] + 1))
    return render_text_crop(printed, height_px, crop_px, rng), answer


# Reading pretraining of the vision tower (scripts/pretrain_reader.py). Real VLMs start from a
# pretrained ViT (MolmoE: CLIP ViT-L/14); micro's is trained from scratch, and the answer loss
# alone never taught it to read (see the module docstring). Its pooled features are first trained
# to name the characters of the transcribe task's text directly, as the reading probe did.
CHARACTERS = string.ascii_lowercase + string.digits + ".-"  # '.' and '-': doc_qa's amounts and dates
END = len(CHARACTERS)  # class index after the last character (and for every position past it)
MAX_CHARACTERS = 12


def character_targets(answers: list[str], max_characters: int = MAX_CHARACTERS) -> torch.Tensor:
    """Answers (lower-case letters, digits, '.' and '-') -> class indices [N, max_characters], END-padded."""
    targets = torch.full((len(answers), max_characters), END, dtype=torch.long)
    for row, answer in enumerate(answers):
        for column, char in enumerate(answer[:max_characters]):
            index = CHARACTERS.find(char)
            if index < 0:
                raise ValueError(f"answer {answer!r} has {char!r}; the reading head knows {CHARACTERS!r}")
            targets[row, column] = index
    return targets


class ReadingHead(nn.Module):
    """One learned query per character position attending over a crop's pooled vision features,
    each read by a linear classifier over CHARACTERS + END. The keys carry a learned embedding of
    their cell, so the queries can tell left from right (the order of the characters)."""

    def __init__(self, width: int, cells: int, n_heads: int = 4, max_characters: int = MAX_CHARACTERS):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(max_characters, width) * 0.02)
        self.cell_embedding = nn.Parameter(torch.randn(cells, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attend = nn.MultiheadAttention(width, num_heads=n_heads, batch_first=True)
        self.classify = nn.Linear(width, END + 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, cells, width] -> logits [N, max_characters, END + 1]."""
        keys = self.norm(features) + self.cell_embedding.to(features.dtype)
        read, _ = self.attend(self.queries.expand(len(features), -1, -1).to(keys.dtype), keys, keys)
        return self.classify(read)


class ReadingCropStream(StepStream):
    """Batches of reading crops: {"step", "pixels" uint8 [B, crop, crop, 3], "targets"
    [B, MAX_CHARACTERS]}; crop i of batch s is `reading_crop(s * B + i)` (see `loop.StepStream`)."""

    def __init__(self, batch_size: int, seed: int, crop_px: int, heights_px: tuple[int, int], start_step: int = 0):
        self.batch_size, self.seed, self.crop_px, self.heights_px, self.start_step = batch_size, seed, crop_px, heights_px, start_step

    def batch(self, step: int) -> dict:
        crops = [reading_crop(step * self.batch_size + i, self.seed, self.crop_px, self.heights_px) for i in range(self.batch_size)]
        return {"step": step, "pixels": torch.from_numpy(np.stack([c for c, _ in crops])),
                "targets": character_targets([answer for _, answer in crops])}

