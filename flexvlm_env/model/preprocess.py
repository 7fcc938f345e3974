"""Image preprocessing and the multimodal token layout, as MolmoE's processor does it.

An image becomes a global view (the whole image resized into one crop) plus rows x cols
overlapping crops of a resized, padded copy. The crops knob picks rows x cols: `exact` tiles into
exactly `crops` crops with the aspect ratio closest to the image (FlexVLM's default, so the knob
acts on every image); `native` is MolmoE's rule, where `crops` is an upper bound and the tiling
follows the image size. Every numerical detail (float32 scale, truncation, antialiased bilinear
resize, centred zero padding, CLIP normalisation, patch flattening order, the shifted
`image_masks` rows) follows the reference processor; `tests/test_molmoe_reference.py` checks it
against the fixture bit for bit.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .args import VisionArgs

IGNORE_INDEX = -100
SUPPORTED_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int
    im_start: int
    im_end: int
    im_patch: int
    im_col: int


@dataclass
class ImageInputs:
    """What the vision tower needs for one image, and where its features go in the sequence."""

    tiling: tuple[int, int]  # (rows, cols)
    images: torch.Tensor  # float32 [n_crops, patches_per_crop, patch_dim]; crop 0 = global view
    image_masks: torch.Tensor  # float32 [n_crops, patches_per_crop] (rows shifted, see module doc)
    image_input_idx: torch.Tensor  # int64 [n_crops, pooled_per_crop], -100 = cell dropped
    tokens: list[int]  # the image token block (<im_start> ... <im_end>, global then tiles)

    @property
    def n_crops(self) -> int:
        return self.images.shape[0]

    @property
    def vision_tokens(self) -> int:
        """Number of positions that receive an image feature."""
        return int((self.image_input_idx >= 0).sum())


def to_rgb_array(image) -> np.ndarray:
    """Validate an image argument and return it as an RGB uint8 array [H, W, 3].

    Accepts a PIL image, raw encoded bytes, or a uint8 array [H, W, 3]. EXIF orientation is ignored,
    as in the reference processor.
    """
    if isinstance(image, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(image))
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"image: could not decode {len(image)} bytes as an image ({err})") from None
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size {image.width}x{image.height}; expected a non-empty image")
        # High-bit-depth and float modes have no agreed 8-bit mapping; converting them silently
        # would clip or wrap values, so the caller must decide.
        if image.mode not in SUPPORTED_MODES:
            raise ValueError(f"image mode {image.mode!r} is not supported; allowed: {SUPPORTED_MODES} (convert it to RGB)")
        # A writable copy for torch; an RGB image is read as it is (convert would copy it once more).
        array = np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        array = image
    else:
        raise ValueError(f"image must be a PIL.Image, encoded bytes or a uint8 [H, W, 3] array, got {type(image).__name__}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size {array.shape[1]}x{array.shape[0]}; expected a non-empty image")
    return array


def select_tiling_native(height: int, width: int, max_crops: int, vision: VisionArgs) -> tuple[int, int]:
    """MolmoE's tiling rule: the cheapest tiling that covers the image without upscaling it.

    Candidates (rows, cols) with rows*cols <= max_crops are ordered by (rows*cols, rows); the scale
    is computed in float32 as the reference does. Images narrower than the margins (< 113 px) would
    divide by a non-positive size in the reference; they are clamped to 1 px here.
    """
    interior_h = np.float32(max(height - vision.margin_total_px, 1))
    interior_w = np.float32(max(width - vision.margin_total_px, 1))
    window = np.float32(vision.window_px)
    candidates = sorted(
        ((r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops),
        key=lambda rc: (rc[0] * rc[1], rc[0]),
    )
    scales = np.array(
        [min(window * np.float32(r) / interior_h, window * np.float32(c) / interior_w) for r, c in candidates],
        dtype=np.float32,
    )
    if np.all(scales < 1):
        return candidates[int(np.argmax(scales))]
    scales[scales < 1] = np.inf
    return candidates[int(np.argmin(scales))]


def select_tiling_exact(height: int, width: int, crops: int, vision: VisionArgs) -> tuple[int, int]:
    """Exactly `crops` crops: the rows x cols factorisation whose canvas aspect is closest to the image's."""
    image_log_aspect = math.log(width / height)
    best = None
    for rows in range(1, crops + 1):
        if crops % rows:
            continue
        cols = crops // rows
        canvas_h, canvas_w = vision.canvas_px(rows, cols)
        error = abs(math.log(canvas_w / canvas_h) - image_log_aspect)
        if best is None or error < best[0] - 1e-12:  # ties keep fewer rows
            best = (error, (rows, cols))
    return best[1]


def resize_and_pad(
    array: np.ndarray | torch.Tensor, target_h: int, target_w: int, vision: VisionArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize keeping the aspect ratio, pad (centred) to the target, normalise.

    `array` is RGB uint8 [H, W, 3] or a batch of same-size images [N, H, W, 3], a numpy array or a
    tensor on the device that should do the work. Returns (normalised image [3, target_h, target_w]
    or [N, 3, target_h, target_w] float32, validity mask [target_h, target_w]).
    """
    if not isinstance(array, torch.Tensor):
        array = torch.tensor(array, dtype=torch.uint8)
    batched = array.dim() == 4
    pixels_nhwc = array if batched else array[None]
    height, width = pixels_nhwc.shape[1:3]
    scale = min(np.float32(target_h) / np.float32(height), np.float32(target_w) / np.float32(width))
    # At least one pixel: a very elongated image (4000 x 10) would round its short side to 0 (the reference
    # processor fails there); a 1-pixel strip is what that side is worth at this scale.
    new_h = max(1, int(np.float32(height) * scale))
    new_w = max(1, int(np.float32(width) * scale))
    device = array.device
    pixels = pixels_nhwc.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    # The reference resizes even when the size is unchanged; antialiased bilinear is not the identity then.
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    pixels = pixels.clamp_(0.0, 1.0)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas = torch.zeros(pixels.shape[0], 3, target_h, target_w, dtype=torch.float32, device=device)
    canvas[:, :, top : top + new_h, left : left + new_w] = pixels
    mask = torch.zeros(target_h, target_w, dtype=torch.float32, device=device)
    mask[top : top + new_h, left : left + new_w] = 1.0
    canvas = normalise(canvas, vision)
    return (canvas if batched else canvas[0]), mask


def normalise(pixels: torch.Tensor, vision: VisionArgs) -> torch.Tensor:
    """RGB in [0, 1], channels first ([..., 3, H, W], float32) -> the ViT's normalised input."""
    mean, std = _normalisation(vision.mean, vision.std, pixels.device)
    return (pixels - mean) / std


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [3, 1, 1] on `device`, made once: building them from Python lists
    on every request is a host-to-device copy that waits for the GPU."""
    return (
        torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None],
        torch.tensor(std, dtype=torch.float32, device=device)[:, None, None],
    )


def to_patches(crop: torch.Tensor, vision: VisionArgs) -> torch.Tensor:
    """[..., 3, crop, crop] -> [..., patches, patch*patch*3], patches row-major, (row, col, channel) inside a patch."""
    n, p = vision.patches_per_side, vision.patch_px
    lead = crop.shape[:-3]
    x = crop.reshape(-1, 3, n, p, n, p).permute(0, 2, 4, 3, 5, 1)  # [B, row, col, py, px, c]
    return x.reshape(*lead, n * n, p * p * 3)


def _patch_fractions(mask: torch.Tensor, vision: VisionArgs) -> torch.Tensor:
    """[..., crop, crop] validity mask -> [..., patches]: the valid fraction of each patch."""
    n, p = vision.patches_per_side, vision.patch_px
    lead = mask.shape[:-2]
    x = mask.reshape(-1, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(*lead, n * n, p * p)
    return x.mean(dim=-1)


def _kept_range(index: int, count: int, vision: VisionArgs) -> tuple[int, int]:
    """Pooled cells a tile keeps along one axis: interior borders drop their margin cells."""
    full, margin = vision.pooled_per_side, vision.margin_pooled
    if count == 1:
        return 0, full
    start = 0 if index == 0 else margin
    length = full - margin if index in (0, count - 1) else full - 2 * margin
    return start, length


def token_layout(rows: int, cols: int, vision: VisionArgs, special: SpecialTokens, offset: int) -> tuple[list[int], torch.Tensor]:
    """The image token block and `image_input_idx` for a rows x cols tiling (fresh copies: callers may
    change them).

    `offset` is the sequence position of the block's first token (1: after BOS). It runs on the host for
    every request; the layout depends on nothing else, so it is built once per (tiling, geometry, offset):
    building it took 0.8 ms a request at 12 crops on an H200's host (results/device/session13/).
    """
    tokens, idx = _token_layout(rows, cols, vision, special, offset)
    return list(tokens), idx.clone()


@functools.lru_cache(maxsize=256)
def _token_layout(rows: int, cols: int, vision: VisionArgs, special: SpecialTokens, offset: int) -> tuple[tuple[int, ...], torch.Tensor]:
    pooled = vision.pooled_per_side
    idx = np.full((rows * cols + 1, pooled * pooled), IGNORE_INDEX, dtype=np.int64)
    # Global view: <im_start>, then per row `pooled` patches and a column token, then <im_end>.
    cell_y, cell_x = np.divmod(np.arange(pooled * pooled), pooled)
    idx[0] = offset + 1 + cell_y * (pooled + 1) + cell_x
    global_len = 2 + pooled * (pooled + 1)

    row_ranges = [_kept_range(r, rows, vision) for r in range(rows)]
    col_ranges = [_kept_range(c, cols, vision) for c in range(cols)]
    grid_h = sum(length for _, length in row_ranges)
    grid_w = sum(length for _, length in col_ranges)
    tile_start = offset + global_len + 1  # after the global block and the tiles' <im_start>
    row_offsets = np.cumsum([0] + [length for _, length in row_ranges])
    col_offsets = np.cumsum([0] + [length for _, length in col_ranges])
    for r, (y0, ph) in enumerate(row_ranges):
        for c, (x0, pw) in enumerate(col_ranges):
            dy, dx = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
            pos = tile_start + (row_offsets[r] + dy) * (grid_w + 1) + col_offsets[c] + dx
            idx[1 + r * cols + c, ((y0 + dy) * pooled + x0 + dx).ravel()] = pos.ravel()

    global_tokens = [special.im_start] + ([special.im_patch] * pooled + [special.im_col]) * pooled + [special.im_end]
    tile_tokens = [special.im_start] + ([special.im_patch] * grid_w + [special.im_col]) * grid_h + [special.im_end]
    return tuple(global_tokens + tile_tokens), torch.from_numpy(idx)


def select_tiling(height: int, width: int, crops: int, vision: VisionArgs, crop_rule: str = "exact") -> tuple[int, int]:
    """(rows, cols) for an image under the crops knob and `crop_rule` ("exact" or "native")."""
    if crop_rule == "exact":
        return select_tiling_exact(height, width, crops, vision)
    if crop_rule == "native":
        return select_tiling_native(height, width, crops, vision)
    raise ValueError(f"crop_rule={crop_rule!r} is not valid; allowed: ('exact', 'native')")


def preprocess_image(
    image,
    crops: int,
    vision: VisionArgs,
    special: SpecialTokens,
    *,
    crop_rule: str = "exact",
    offset: int = 1,
    device: torch.device | str = "cpu",
) -> ImageInputs:
    """Tile, resize, normalise and patchify one image; lay out its tokens.

    The pixel work runs on `device`: on a GPU only the uint8 image is uploaded (a few MB instead of
    the 17 MB of float patches at 12 crops) and resizing takes well under a millisecond. The layout
    tensors (`image_input_idx`) stay on the host, where positions are computed.
    """
    array = to_rgb_array(image)
    # No host copy of a writable array (a PIL image's always is): only the upload, or nothing on the CPU,
    # where nothing below writes into the pixels.
    pixels = (torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)).to(device, non_blocking=True)
    batch = preprocess_image_batch(pixels[None], crops, vision, special, crop_rule=crop_rule, offset=offset)
    return ImageInputs(batch.tiling, batch.images[0], batch.image_masks, batch.image_input_idx, batch.tokens)


def preprocess_image_batch(
    pixels: torch.Tensor,
    crops: int,
    vision: VisionArgs,
    special: SpecialTokens,
    *,
    crop_rule: str = "exact",
    offset: int = 1,
) -> ImageInputs:
    """`preprocess_image` for N images of one size at once (training batches): `pixels` is uint8
    [N, H, W, 3] on the device that does the work. Same-size images share the tiling, the masks and
    the token layout, so only `images` gains the batch dimension: [N, n_crops, patches, patch_dim]."""
    if pixels.dim() != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    height, width = pixels.shape[1:3]
    rows, cols = select_tiling(height, width, crops, vision, crop_rule)
    crop_px, window = vision.crop_px, vision.window_px
    device = pixels.device
    tiled, mask = resize_and_pad(pixels, *vision.canvas_px(rows, cols), vision)
    global_view, _ = resize_and_pad(pixels, crop_px, crop_px, vision)

    # All overlapping tiles at once (tile (r, c) starts at window * (r, c)): a handful of kernels
    # instead of a few per tile, which on a GPU made host preprocessing a large, noisy stage.
    n_images = pixels.shape[0]
    tiles = tiled.unfold(2, crop_px, window).unfold(3, crop_px, window)[:, :, :rows, :cols]  # [N, 3, R, C, crop, crop]
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(n_images, rows * cols, 3, crop_px, crop_px)
    patches = torch.cat([to_patches(global_view, vision)[:, None], to_patches(tiles, vision)], dim=1)
    tile_masks = mask.unfold(0, crop_px, window).unfold(1, crop_px, window)[:rows, :cols]
    fractions = _patch_fractions(tile_masks.reshape(rows * cols, crop_px, crop_px), vision)
    # Reference quirk: mask rows are shifted by one (the global view gets tile 0's row, the last
    # tile gets -1, i.e. "partial padding"); trained checkpoints expect it.
    masks = torch.cat([fractions, torch.full((1, vision.patches_per_crop), -1.0, device=device)])
    tokens, idx = token_layout(rows, cols, vision, special, offset)
    return ImageInputs((rows, cols), patches, masks, idx, tokens)


def vision_token_count(rows: int, cols: int, vision: VisionArgs) -> int:
    """Positions that receive an image feature for a rows x cols tiling (global view included):
    the global view's cells plus the tile grid, whose interior borders drop their margins."""
    pooled, margin = vision.pooled_per_side, vision.margin_pooled
    grid_h = (pooled - 2 * margin) * rows + 2 * margin
    grid_w = (pooled - 2 * margin) * cols + 2 * margin
    return pooled * pooled + grid_h * grid_w


def build_input_ids(prompt_ids: Sequence[int], special: SpecialTokens, image_tokens: Sequence[int] | None) -> list[int]:
    """BOS, the image block (if any), then the prompt tokens."""
    return [special.bos, *(image_tokens or ()), *prompt_ids]
