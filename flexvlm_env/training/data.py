"""The training stream: procedural samples turned into padded, teacher-forced batches.

Batch `step` is a pure function of (seed, step): the families are drawn from a generator seeded
with both, and slot i of the batch is sample `step * batch_size + i` of its family's `train`
split, so no sample repeats within a run and a resumed run continues with exactly the batch it
would have seen. With several GPUs, shard r of n builds slots [r * B/n, (r + 1) * B/n) of that
same global batch (each slot's own random draws are seeded by the slot, so a shard needs nothing
from the others). `TrainStream` is an `IterableDataset` whose DataLoader workers each build every
`num_workers`-th batch on the CPU (drawing, tokenising, laying out the sequence); only the uint8
pixels travel to the GPU, where `preprocess_image_batch` tiles same-size images together.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..model.args import ModelArgs, VisionArgs
from ..model.preprocess import IGNORE_INDEX, SpecialTokens, preprocess_image_batch, select_tiling, to_rgb_array, token_layout
from ..model.tokenizer import TextTokenizer
from ..tasks import FAMILIES
from ..tasks.procedural import generate_sample
from ..tasks.sample import Sample
from .knobs import ElasticKnobs
from .loop import StepStream
from .reading import TRAINING_ONLY_FAMILIES, TRANSCRIBE, transcribe_sample

VQA_STYLE_METRICS = ("vqa_accuracy",)


def training_target(sample: Sample, rng: np.random.Generator) -> str:
    """The answer a sample is trained to produce: the annotators' majority answer for VQA-style
    references (the one that scores 1.0), a random reference caption, otherwise the reference."""
    if sample.metric in VQA_STYLE_METRICS:
        return Counter(sample.answers).most_common(1)[0][0]
    if sample.metric == "cider":
        return sample.answers[int(rng.integers(len(sample.answers)))]
    return sample.answers[0]


def training_sample(family: str, index: int, seed: int) -> Sample:
    """Sample `index` of a family's train split, or of a training-only task (`reading.TRANSCRIBE`)."""
    if family == TRANSCRIBE:
        return transcribe_sample(index, seed)
    return generate_sample(family, "train", index, seed=seed)


@dataclass(frozen=True)
class TrainBatchSpec:
    """What a batch holds. `family_weights` (default uniform) are relative sampling weights; the
    first `focus_steps` steps draw families by `focus_weights` instead (a curriculum, e.g. the
    reading families first: their loss never leaves the text-only prior when they are a third of
    mixed, mostly reduced-configuration batches)."""

    batch_size: int = 256
    seed: int = 0
    families: tuple[str, ...] = tuple(FAMILIES)
    family_weights: tuple[float, ...] | None = None
    task_seed: int = 0  # the procedural suite's seed (0: the canonical train split)
    pad_to_multiple: int = 8
    shard_index: int = 0  # this process's share of the global batch (data parallelism)
    shard_count: int = 1
    focus_steps: int = 0
    focus_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not (self.shard_count >= 1 and 0 <= self.shard_index < self.shard_count):
            raise ValueError(f"shard_index={self.shard_index}, shard_count={self.shard_count}: need 0 <= index < count")
        if self.batch_size % self.shard_count:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of shard_count={self.shard_count}")
        unknown = set(self.families) - set(FAMILIES) - set(TRAINING_ONLY_FAMILIES)
        if unknown or not self.families or len(set(self.families)) != len(self.families):
            raise ValueError(f"families={self.families} must be distinct names from {tuple(FAMILIES) + TRAINING_ONLY_FAMILIES}")
        for name in ("family_weights", "focus_weights"):
            weights = getattr(self, name)
            if weights is not None and (len(weights) != len(self.families) or min(weights) < 0 or sum(weights) <= 0):
                raise ValueError(f"{name}={weights} must be {len(self.families)} non-negative weights with a positive sum")
        if self.focus_steps < 0:
            raise ValueError(f"focus_steps={self.focus_steps} must be >= 0")
        if self.focus_steps and self.focus_weights is None:
            raise ValueError(f"focus_steps={self.focus_steps} needs focus_weights (one per family of {self.families})")

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.shard_count

    @property
    def local_slots(self) -> range:
        """Slots of the global batch this shard builds."""
        return range(self.shard_index * self.local_batch_size, (self.shard_index + 1) * self.local_batch_size)

    def probabilities(self, step: int | None = None) -> np.ndarray:
        """Family sampling probabilities at `step` (None: after the focus phase)."""
        if step is not None and step < self.focus_steps:
            weights = np.asarray(self.focus_weights, float)
        else:
            weights = np.ones(len(self.families)) if self.family_weights is None else np.asarray(self.family_weights, float)
        return weights / weights.sum()


def build_batch(step: int, spec: TrainBatchSpec, knobs: ElasticKnobs, args: ModelArgs, tokenizer: TextTokenizer) -> dict:
    """Everything of batch `step` except the pixel preprocessing (see module docstring).

    Returns a dict of tensors and lists:
      groups: list of (pixels uint8 [n, H, W, 3], rows [n]) per image size, in feature order;
      input_ids, labels [B, L] (labels: the next token at answer positions, IGNORE_INDEX elsewhere);
      feature_pos [F] flat positions in B*L, and feature_rows [F] rows of the concatenated pooled
      features (groups in order, then sample, crop, cell) that are added there;
      family [B] family indices into spec.families; step; crops.
    """
    rng = np.random.default_rng([spec.seed, step, 0x64617461])
    # The whole global batch's families (every shard draws the same), then this shard's slots.
    family_ids = rng.choice(len(spec.families), size=spec.batch_size, p=spec.probabilities(step))[spec.local_slots]
    crops = knobs.draw(spec.seed, step).crops
    special = tokenizer.special
    vision = args.vision

    sequences, targets, arrays = [], [], []
    for slot, family_id in zip(spec.local_slots, family_ids):
        sample = training_sample(spec.families[family_id], step * spec.batch_size + slot, spec.task_seed)
        arrays.append(to_rgb_array(sample.image))
        answer = training_target(sample, np.random.default_rng([spec.seed, step, slot, 0x74617267]))
        sequences.append(tokenizer.encode_prompt(sample.prompt))
        targets.append(tokenizer.encode(" " + answer) + [special.eos])

    by_size: dict[tuple[int, int], list[int]] = {}
    for slot, array in enumerate(arrays):
        by_size.setdefault(array.shape[:2], []).append(slot)
    layouts = {}
    for size in by_size:
        rows, cols = select_tiling(size[0], size[1], crops, vision)
        layouts[size] = token_layout(rows, cols, vision, special, offset=1)

    full = []
    for slot, array in enumerate(arrays):
        image_tokens, _ = layouts[array.shape[:2]]
        full.append([special.bos, *image_tokens, *sequences[slot]])
    length = max(len(ids) + len(t) for ids, t in zip(full, targets))
    length = -(-length // spec.pad_to_multiple) * spec.pad_to_multiple
    if length > args.max_seq_len:
        raise ValueError(f"batch {step} needs {length} tokens; the model's max_seq_len is {args.max_seq_len}")
    input_ids = torch.full((spec.local_batch_size, length), special.pad, dtype=torch.long)
    labels = torch.full((spec.local_batch_size, length), IGNORE_INDEX, dtype=torch.long)
    for slot, (ids, target) in enumerate(zip(full, targets)):
        sequence = ids + target
        input_ids[slot, : len(sequence)] = torch.tensor(sequence)
        # Position p predicts token p + 1: the answer tokens are predicted from the last prompt
        # token onwards.
        labels[slot, len(ids) - 1 : len(sequence) - 1] = torch.tensor(target)

    groups, feature_pos, feature_rows = [], [], []
    row_offset = 0
    for size, slots in by_size.items():
        _, idx = layouts[size]  # [n_crops, cells], -100 = dropped cell
        flat_idx = idx.reshape(-1)
        kept = torch.nonzero(flat_idx >= 0).flatten()
        per_sample = flat_idx.numel()
        for n, slot in enumerate(slots):
            feature_pos.append(flat_idx[kept] + slot * length)
            feature_rows.append(kept + row_offset + n * per_sample)
        row_offset += len(slots) * per_sample
        pixels = torch.from_numpy(np.stack([arrays[s] for s in slots]))
        groups.append((pixels, torch.tensor(slots)))
    return {
        "step": step,
        "crops": crops,
        "groups": groups,
        "input_ids": input_ids,
        "labels": labels,
        "feature_pos": torch.cat(feature_pos),
        "feature_rows": torch.cat(feature_rows),
        "family": torch.from_numpy(family_ids.astype(np.int64)),
    }


def batch_views(batch: dict, crops: int, vision: VisionArgs, special: SpecialTokens, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of a `build_batch` batch -> (views [V, patches, patch_dim] float32, masks [V, patches])
    on `device`, each same-size group tiled at once, views in the batch's feature-row order."""
    images, masks = [], []
    for pixels, _slots in batch["groups"]:
        inputs = preprocess_image_batch(pixels.to(device, non_blocking=True), crops, vision, special)
        n = inputs.images.shape[0]
        images.append(inputs.images.reshape(-1, *inputs.images.shape[2:]))
        masks.append(inputs.image_masks[None].expand(n, -1, -1).reshape(-1, inputs.image_masks.shape[-1]))
    return torch.cat(images), torch.cat(masks)


class TrainStream(StepStream):
    """`build_batch` for steps `start_step, start_step + 1, ...` (see `loop.StepStream`)."""

    def __init__(self, spec: TrainBatchSpec, knobs: ElasticKnobs, args: ModelArgs, tokenizer: TextTokenizer, start_step: int = 0):
        self.spec, self.knobs, self.args, self.tokenizer, self.start_step = spec, knobs, args, tokenizer, start_step

    def batch(self, step: int) -> dict:
        return build_batch(step, self.spec, self.knobs, self.args, self.tokenizer)
