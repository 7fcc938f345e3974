"""Draw a gallery of procedural task samples: one row per family, prompt and answers under each.

    python scripts/make_gallery.py --out results/figures/task_gallery.png --per-family 4 --split val --seed 0

Images are pasted at native resolution (no rescaling), so the gallery shows what the model would
have to resolve. Difficulty parameters are printed under each sample.
"""
from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tyro
from PIL import Image, ImageDraw

from flexvlm_env.tasks import FAMILIES
from flexvlm_env.tasks.procedural import generate_sample
from flexvlm_env.tasks.procedural.render import draw_text_line, font

CELL_IMAGE_PX = 384  # the largest side of any default procedural image
CELL_PAD_PX = 14
TEXT_FONT_PX = 12
TITLE_FONT_PX = 18
WRAP_CHARS = 58


@dataclass
class Args:
    out: str = "results/figures/task_gallery.png"
    """where to write the gallery PNG"""
    per_family: int = 4
    """samples per family (one row per family)"""
    split: str = "val"
    """split to draw samples from"""
    seed: int = 0
    """procedural seed"""
    start_index: int = 0
    """index of the first sample of each family"""


def parse_args() -> Args:
    return tyro.cli(Args, description=__doc__.splitlines()[0])


def caption_lines(sample) -> list[str]:
    """The text printed under one sample: prompt, references, difficulty."""
    lines = []
    for line in sample.prompt.splitlines():
        lines += textwrap.wrap(line, WRAP_CHARS) or [""]
    if sample.family == "coco_caption":
        refs = [f"- {caption}" for caption in sample.answers[:3]] + [f"  (+{len(sample.answers) - 3} more)"]
    else:
        counts = Counter(sample.answers)
        refs = ["answers: " + ", ".join(f"{a} x{c}" if c > 1 else a for a, c in counts.items())]
    for ref in refs:
        lines += textwrap.wrap(ref, WRAP_CHARS, subsequent_indent="  ")
    difficulty = ", ".join(f"{k}={v}" for k, v in sample.difficulty.items() if k not in ("image_width_px", "image_height_px"))
    lines += textwrap.wrap(f"[{sample.image.width}x{sample.image.height}] {difficulty}", WRAP_CHARS, subsequent_indent="  ")
    return lines


def main(args: Args) -> None:
    cell_w = CELL_IMAGE_PX + CELL_PAD_PX
    line_px = round(TEXT_FONT_PX * 1.3)
    rows = []
    for family in FAMILIES:
        samples = [generate_sample(family, args.split, args.start_index + k, args.seed) for k in range(args.per_family)]
        texts = [caption_lines(sample) for sample in samples]
        rows.append((family, samples, texts, TITLE_FONT_PX * 2 + CELL_IMAGE_PX + 8 + line_px * max(map(len, texts)) + CELL_PAD_PX))
    gallery = Image.new("RGB", (CELL_PAD_PX + cell_w * args.per_family, sum(row[3] for row in rows)), (60, 60, 66))
    draw = ImageDraw.Draw(gallery)
    y = 0
    for family, samples, texts, row_h in rows:
        spec = FAMILIES[family]
        title = f"{family}  (metric {spec.metric}, skill: {spec.skill})"
        draw_text_line(draw, title, (CELL_PAD_PX, y + 8), TITLE_FONT_PX, (255, 255, 255))
        top = y + TITLE_FONT_PX * 2
        for k, (sample, lines) in enumerate(zip(samples, texts)):
            x = CELL_PAD_PX + k * cell_w
            draw.rectangle((x, top, x + CELL_IMAGE_PX - 1, top + CELL_IMAGE_PX - 1), fill=(40, 40, 44))
            offset = ((CELL_IMAGE_PX - sample.image.width) // 2, (CELL_IMAGE_PX - sample.image.height) // 2)
            gallery.paste(sample.image, (x + offset[0], top + offset[1]))
            for j, line in enumerate(lines):
                draw.text((x, top + CELL_IMAGE_PX + 8 + j * line_px), line, font=font(TEXT_FONT_PX), fill=(235, 235, 235))
        y += row_h
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gallery.save(out, optimize=True)
    print(f"wrote {out} ({gallery.width}x{gallery.height} px, {out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(parse_args())
