"""Changing a trained model's crop size: start a model with larger (or smaller) crops from weights
trained at another size, as ViTs are fine-tuned at a new resolution.

Every tensor of the MolmoE topology is independent of the crop size except the ViT's absolute
position table (`positional_embedding`, one row for the class token and one per patch of the crop's
grid). `resample_positions` resizes the grid part bicubically and keeps the class row;
`load_across_crop_size_` loads a FlexVLM checkpoint whose model differs from the target only in
`vision.crop_px` (anything else is refused: a different topology is not a resolution change);
checkpoints of the same geometry, or without recorded args, take the plain strict load.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.args import ModelArgs, preset_args
from ..model.molmoe import MolmoE

POSITION_TABLE = "positional_embedding"


def resample_positions(table: torch.Tensor, side: int) -> torch.Tensor:
    """ViT position table [1 + n*n, W] (class row first, patches row-major) -> [1 + side*side, W]."""
    rows, width = table.shape
    n = int(round((rows - 1) ** 0.5))
    if n * n != rows - 1:
        raise ValueError(f"a position table of {rows} rows is not 1 + a square grid")
    if side < 1:
        raise ValueError(f"side={side} must be >= 1")
    if side == n:
        return table.clone()
    grid = table[1:].float().reshape(1, n, n, width).permute(0, 3, 1, 2)
    # align_corners=False: a patch's position is its centre, so the grid's extent maps onto the new one.
    resized = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([table[:1].float(), resized.permute(0, 2, 3, 1).reshape(side * side, width)]).to(table.dtype)


@torch.no_grad()
def load_across_crop_size_(model: MolmoE, path: str | Path) -> list[str]:
    """Copy the FlexVLM checkpoint `path` into `model`, whose args may differ from the checkpoint's
    in `vision.crop_px` only: every tensor is copied as is except the ViT position table, which is
    resampled to the model's patch grid. Returns the names of the resampled tensors (empty when
    the crop sizes agree)."""
    from ..model.checkpoint import load_weights_, read_metadata

    target_args = model.args
    meta = read_metadata(Path(path))
    source_args = ModelArgs.from_dict(json.loads(meta["args"])) if meta.get("format") == "flexvlm" and "args" in meta else None
    if source_args is None or source_args == target_args:
        # Same geometry, or an official checkpoint (no recorded args): the plain strict load.
        load_weights_(model, Path(path))
        return []
    if replace(source_args, vision=replace(source_args.vision, crop_px=target_args.vision.crop_px)) != target_args:
        raise ValueError(f"{path} holds another model than the one being trained (beyond its crop size): "
                         f"checkpoint {source_args.to_dict()} vs {target_args.to_dict()}")
    source = MolmoE(source_args)
    load_weights_(source, Path(path))
    resampled = []
    sources = dict(source.named_parameters())
    for name, target in model.named_parameters():
        tensor = sources[name]
        if name.endswith(POSITION_TABLE) and tensor.shape != target.shape:
            tensor = resample_positions(tensor, target_args.vision.patches_per_side)
            resampled.append(name)
        target.copy_(tensor)
    return resampled


def micro_args(crop_px: int) -> ModelArgs:
    """The micro preset at crop size `crop_px` (everything else as shipped)."""
    micro = preset_args("micro")
    try:
        return replace(micro, vision=replace(micro.vision, crop_px=crop_px))
    except ValueError as error:
        raise ValueError(f"--crop-px={crop_px} is not valid ({error}); allowed: a multiple of "
                         f"{micro.vision.patch_px * micro.vision.pool} px, e.g. 224 (shipped) or 112") from None
