"""Can micro's vision tower learn to read, and at what text size? A probe for issue [micro].

    python scripts/reading_probe.py                          # about 7.5 minutes per height on a 2-core CPU
    python scripts/reading_probe.py --steps 300 --heights-px 12 28 --eval-images 256   # a quick look

micro cannot read (text_vqa, st_qa about 0 after 3.6 M training requests), and the resolution
analysis (`scripts/analyze_resolution.py`) says why it might not: at 12 crops the median decisive
text is 8-14 px tall in the canvas micro's 112 px crops see, against 28 px per vision token. This
probe separates "too small to read" from "reading needs more training": micro's own ViT
(`VisionTransformer` with the preset's width, depth and 14 px patches, randomly initialised) sees
one 112 px crop holding a random 3-letter upper-case word whose ink is `h` px tall (random
position, colours, background noise) and is trained to name the three letters (three learned
queries attend over the ViT's patch features, each read by a 26-way linear head). The same
number of steps, batch and learning rate at every height, so the curves differ only in text size.

Chance is 1/26 = 3.8% per letter and 0.006% per word. Writes a JSON (per height: the
held-out letter and word accuracy over training, wall time) and a figure. Nothing here touches
the shipped model: it is evidence for the preset decision (crop size) of micro's next training run.
"""
from __future__ import annotations

import json
import platform
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn

from flexvlm_env.model.args import preset_args
from flexvlm_env.model.preprocess import normalise, to_patches
from flexvlm_env.model.runtime import load_model
from flexvlm_env.model.vision import AttentionPool2d, VisionTransformer
from flexvlm_env.training.reading import font_size_for_height, render_text_crop

LETTERS = string.ascii_uppercase
READ_FROM = ("patches", "pooled")
INITS = ("random", "shipped")
WORD_LENGTH = 3


@dataclass
class Args:
    heights_px: tuple[int, ...] = (8, 14, 20, 28)
    """ink heights of the words to compare (micro at 12 crops: median 8 / 10 / 14 px for doc_qa /
    st_qa / text_vqa; with 224 px crops 19-35 px)"""
    steps: int = 1500
    """optimizer steps per height"""
    batch_size: int = 128
    lr: float = 1e-3
    eval_every: int = 100
    eval_images: int = 1024
    """held-out images per height (fixed seed)"""
    seed: int = 0
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    read_from: str = "patches"
    """what the letter queries attend over: "patches" (the ViT's two-layer patch features) or
    "pooled" (after micro's own 2x2 attention pooling, 64 dims per 28 px cell: what the language
    model receives, up to the projector)"""
    init: str = "random"
    """the vision tower's starting weights: "random" or "shipped" (micro's trained ViT and pooling,
    which never learned to read: does it start ahead of a random one, or behind?)"""
    out: Path = Path("results/reading_probe.json")
    figure: Path = Path("results/figures/reading_probe.png")

    def __post_init__(self) -> None:
        crop = preset_args("micro").vision.crop_px
        for h in self.heights_px:
            if not 6 <= h <= crop // 2:
                raise ValueError(f"--heights-px {h} is not valid; allowed: 6 to {crop // 2} (the crop is {crop} px)")
        for name in ("steps", "batch_size", "eval_every", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr} must be > 0")
        if self.read_from not in READ_FROM:
            raise ValueError(f"--read-from={self.read_from!r} is not valid; allowed: {READ_FROM}")
        if self.init not in INITS:
            raise ValueError(f"--init={self.init!r} is not valid; allowed: {INITS}")


def render_word(word: str, height_px: int, crop_px: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [crop, crop, 3]: `word` at ink height `height_px` (see `render_text_crop`)."""
    return render_text_crop(word, height_px, crop_px, rng)


def make_batch(n: int, height_px: int, crop_px: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(LETTERS), (n, WORD_LENGTH))
    images = np.stack([render_word("".join(LETTERS[i] for i in row), height_px, crop_px, rng) for row in labels])
    return images, labels


class Reader(nn.Module):
    """micro's ViT (and, with `read_from="pooled"`, its 2x2 attention pooling), then one learned
    query per letter attending over the features."""

    def __init__(self, read_from: str = "patches"):
        super().__init__()
        self.vision = preset_args("micro").vision
        self.vit = VisionTransformer(self.vision)
        nn.init.normal_(self.vit.positional_embedding, std=0.02)  # the checkpoint layout starts them at 0
        self.pool = AttentionPool2d(self.vision) if read_from == "pooled" else None
        # Two ViT layers' features, as the model uses them; the pooling maps them to the ViT width.
        features = self.vision.width if self.pool is not None else 2 * self.vision.width
        self.queries = nn.Parameter(torch.randn(WORD_LENGTH, features) * 0.02)
        self.attend = nn.MultiheadAttention(features, num_heads=4, batch_first=True)
        self.head = nn.Linear(features, len(LETTERS))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """[B, crop, crop, 3] uint8 -> letter logits [B, 3, 26]."""
        pixels = normalise(images_uint8.permute(0, 3, 1, 2).float() / 255.0, self.vision)
        features = self.vit(to_patches(pixels, self.vision))
        if self.pool is not None:
            features = self.pool(features)
        queries = self.queries.expand(len(features), -1, -1)
        read, _ = self.attend(queries, features, features)
        return self.head(read)


@torch.no_grad()
def evaluate(model: Reader, images: torch.Tensor, labels: torch.Tensor) -> dict:
    model.eval()
    predicted = torch.cat([model(chunk).argmax(-1) for chunk in images.split(256)])
    model.train()
    correct = predicted == labels
    return {"letter_accuracy": float(correct.float().mean()), "word_accuracy": float(correct.all(dim=1).float().mean())}


def probe(height_px: int, args: Args) -> dict:
    torch.manual_seed(args.seed)
    model = Reader(args.read_from)
    if args.init == "shipped":
        shipped = load_model("micro", device="cpu").module.vision_backbone
        model.vit.load_state_dict(shipped.image_vit.state_dict())
        if model.pool is not None:
            model.pool.load_state_dict(shipped.image_pooling_2d.state_dict())
    crop = model.vision.crop_px
    held_out = make_batch(args.eval_images, height_px, crop, np.random.default_rng([args.seed, height_px, 1]))
    eval_images, eval_labels = torch.from_numpy(held_out[0]), torch.from_numpy(held_out[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng([args.seed, height_px, 0])
    curve, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = make_batch(args.batch_size, height_px, crop, rng)
        # Linear warm-up over the first 5% of steps, then constant: the same schedule at every height.
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, args.steps // 20))
        logits = model(torch.from_numpy(images))
        loss = F.cross_entropy(logits.reshape(-1, len(LETTERS)), torch.from_numpy(labels).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "images_seen": step * args.batch_size, "train_loss": float(loss.detach()),
                     **evaluate(model, eval_images, eval_labels), "elapsed_s": time.perf_counter() - started}
            curve.append(point)
            print(f"h={height_px:2d} px step {step:5d} loss {point['train_loss']:.3f} letters {point['letter_accuracy']:.3f} "
                  f"words {point['word_accuracy']:.3f} ({point['elapsed_s']:.0f} s)", flush=True)
    return {"height_px": height_px, "font_size_px": font_size_for_height(height_px), "final": curve[-1], "curve": curve}


def plot(result: dict, path: Path) -> None:
    from flexvlm_env.experiments.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in result["runs"]:
        steps = [p["images_seen"] / 1e3 for p in run["curve"]]
        for ax, key in zip(axes, ("letter_accuracy", "word_accuracy")):
            ax.plot(steps, [p[key] for p in run["curve"]], label=f"{run['height_px']} px text")
    axes[0].axhline(1 / len(LETTERS), color="grey", lw=1, ls=":", label="chance")
    axes[0].set(xlabel="training images (thousands)", ylabel="held-out letter accuracy", title="micro's ViT reading 3 letters")
    axes[1].set(xlabel="training images (thousands)", ylabel="held-out word accuracy", title="whole word")
    axes[0].legend(fontsize=8)
    save_figure(fig, path, dpi=120)


SAME_SETTINGS = ("steps", "batch_size", "lr", "eval_every", "eval_images", "seed", "read_from", "init")


def _header(args: Args) -> dict:
    vision = preset_args("micro").vision
    return {
        "probe": "reading", "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
        "machine": {"device": "cpu", "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "vit": {"width": vision.width, "layers": vision.n_layers, "patch_px": vision.patch_px, "crop_px": vision.crop_px,
                "token_px": vision.patch_px * vision.pool},
        "chance": {"letter_accuracy": 1 / len(LETTERS), "word_accuracy": len(LETTERS) ** -WORD_LENGTH},
    }


def finished_runs(path: Path, args: Args) -> dict[int, dict]:
    """Heights an earlier run of the same settings already finished (`--out` is resumed height by
    height: a crash or a longer --heights-px list loses and repeats no finished height)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    saved["args"] = {"read_from": "patches", "init": "random", **saved["args"]}  # the settings before those options
    if any(saved["args"].get(key) != getattr(args, key) for key in SAME_SETTINGS):
        raise ValueError(f"{path} holds a probe with other settings ({ {k: saved['args'].get(k) for k in SAME_SETTINGS} }); "
                         "use another --out or the same settings")
    return {run["height_px"]: run for run in saved["runs"]}


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    done = finished_runs(args.out, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {**_header(args), "runs": [done[h] for h in sorted(done)]}
    for height in args.heights_px:
        if height in done:
            print(f"h={height:2d} px: finished earlier, kept")
            continue
        done[height] = probe(height, args)
        result = {**_header(args), "runs": [done[h] for h in sorted(done)]}
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after every height: resumable
    plot(result, args.figure)
    print(json.dumps({f"{r['height_px']} px": {k: round(r["final"][k], 3) for k in ("letter_accuracy", "word_accuracy")}
                      for r in result["runs"]}, indent=1))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
