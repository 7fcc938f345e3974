"""Model dimensions: the `ModelArgs` dataclass, its two presets, and the MolmoE config reader.

`molmoe-1b` is the exact MolmoE-1B topology; `micro` keeps every structural choice (16 blocks,
64 experts, top-8, global view + up to 12 crops, 2x2 pooling, the same tiling rule and token
layout) at narrow widths and a small crop so that it runs on a laptop CPU. A checkpoint's own
`config.json` (the official Molmo format) overrides the preset's sizes, which is how the tiny
reference fixture and real checkpoints are built.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionArgs:
    """ViT, pooling and crop geometry."""

    width: int = 1024
    n_layers: int = 23
    n_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 4096
    vit_layers: tuple[int, ...] = (-2, -9)
    norm_eps: float = 1e-5
    crop_px: int = 336
    patch_px: int = 14
    pool: int = 2  # 2x2 attention pooling
    margin_patches: int = 4  # overlap margin of a crop on each side, in patches
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.crop_px % self.patch_px:
            raise ValueError(f"crop_px={self.crop_px} must be a multiple of patch_px={self.patch_px}")
        if self.patches_per_side % self.pool or self.margin_patches % self.pool:
            raise ValueError("patches per side and margin_patches must be multiples of pool")
        if self.window_px <= 0:
            raise ValueError(f"margin_patches={self.margin_patches} leaves no crop interior")
        for layer in self.vit_layers:
            if not -self.n_layers <= layer < self.n_layers:
                raise ValueError(f"vit_layers entry {layer} is outside a {self.n_layers}-layer ViT")

    @property
    def patches_per_side(self) -> int:
        return self.crop_px // self.patch_px

    @property
    def patches_per_crop(self) -> int:
        return self.patches_per_side**2

    @property
    def patch_dim(self) -> int:
        return self.patch_px * self.patch_px * 3

    @property
    def pooled_per_side(self) -> int:
        return self.patches_per_side // self.pool

    @property
    def margin_pooled(self) -> int:
        return self.margin_patches // self.pool

    @property
    def margin_total_px(self) -> int:
        """Both margins of a crop together (112 px for MolmoE)."""
        return 2 * self.margin_patches * self.patch_px

    @property
    def window_px(self) -> int:
        """Non-overlapping interior of a crop (224 px for MolmoE)."""
        return self.crop_px - self.margin_total_px

    def canvas_px(self, rows: int, cols: int) -> tuple[int, int]:
        """(height, width) of the resized image a rows x cols tiling cuts its crops from."""
        return self.window_px * rows + self.margin_total_px, self.window_px * cols + self.margin_total_px

    @property
    def layers_to_run(self) -> int:
        """ViT blocks that must run: up to the deepest one whose output is used."""
        return max(layer % self.n_layers for layer in self.vit_layers) + 1


@dataclass(frozen=True)
class ModelArgs:
    """Decoder sizes plus the vision tower; everything the runtime needs to build the model."""

    name: str = "molmoe-1b"
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_experts: int = 64
    expert_hidden: int = 1024
    top_k: int = 8
    # MolmoE (and OLMoE) keep the top_k router probabilities as they are: a block at top_k = k adds
    # the k heaviest experts at their full-softmax weights. True renormalises the kept weights to
    # sum to 1 (Mixtral; OLMoE's `norm_topk_prob`), which changes what the width knob computes: an
    # ablation of micro's router (scripts/train_micro.py --norm-topk-prob), not MolmoE-1B.
    norm_topk_prob: bool = False
    vocab_size: int = 50280  # tokenizer vocabulary (for reference only)
    embedding_size: int = 50304  # rows of wte.embedding and lm_head
    additional_vocab_size: int = 128  # rows of wte.new_embedding
    projector_hidden: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_crops: int = 12
    max_seq_len: int = 4096
    vision: VisionArgs = field(default_factory=VisionArgs)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelArgs":
        data = dict(data)
        vision = VisionArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("vision").items()})
        return cls(**data, vision=vision)


PRESETS: dict[str, ModelArgs] = {
    "molmoe-1b": ModelArgs(),
    "micro": ModelArgs(
        name="micro",
        d_model=128,
        n_layers=16,
        n_heads=4,
        n_experts=64,
        expert_hidden=16,
        top_k=8,
        vocab_size=1024,
        embedding_size=1024,
        additional_vocab_size=0,
        projector_hidden=128,
        max_seq_len=1024,
        vision=VisionArgs(
            width=64, n_layers=6, n_heads=4, head_dim=16, mlp_dim=256, vit_layers=(-1, -4),
            crop_px=224, patch_px=14, pool=2, margin_patches=2,
        ),
    ),
}


def preset_args(preset: str) -> ModelArgs:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"preset={preset!r} is not known; allowed: {sorted(PRESETS)}") from None


def args_from_molmo_config(config: Mapping[str, Any], name: str = "molmoe-1b") -> ModelArgs:
    """Read an official Molmo/MolmoE `config.json` into ModelArgs.

    Only the MoE decoder with the settings FlexVLM implements is accepted; anything else is an
    error rather than a silent approximation.
    """
    expected = {
        "block_type": "moe",
        "activation_type": "swiglu",
        "layer_norm_type": "rms",
        "attention_layer_norm": True,
        "rope": True,
        "weight_tying": False,
        "image_pooling_2d": "attention-meanq",
        "image_projector": "mlp",
        "use_col_tokens": True,
        "norm_after": False,
    }
    for key, value in expected.items():
        if key in config and config[key] != value:
            raise ValueError(f"checkpoint config {key}={config[key]!r} is not supported (FlexVLM implements {value!r})")
    if config.get("n_kv_heads") not in (None, config["n_heads"]):
        raise ValueError(f"checkpoint config n_kv_heads={config['n_kv_heads']!r}: grouped-query attention is not supported")
    if config.get("moe_shared_expert"):
        raise ValueError("checkpoint config moe_shared_expert=True is not supported")
    d_model = int(config["d_model"])
    hidden = config.get("mlp_hidden_size") or d_model * int(config.get("mlp_ratio", 1))
    vb = config["vision_backbone"]
    crop_h, crop_w = vb.get("image_default_input_size", (336, 336))
    if crop_h != crop_w:
        raise ValueError(f"non-square crops {crop_h}x{crop_w} are not supported")
    overlap = config.get("overlap_margins", (4, 4))
    vision = VisionArgs(
        width=int(vb["image_emb_dim"]),
        n_layers=int(vb["image_num_layers"]),
        n_heads=int(vb["image_num_heads"]),
        head_dim=int(vb["image_head_dim"]),
        mlp_dim=int(vb["image_mlp_dim"]),
        vit_layers=tuple(int(x) for x in config.get("vit_layers", (-2, -9))),
        norm_eps=float(vb.get("image_norm_eps", 1e-5)),
        crop_px=int(crop_h),
        patch_px=int(vb.get("image_patch_size", 14)),
        pool=int(config.get("image_pooling_h", 2)),
        margin_patches=int(overlap[0]),
    )
    return ModelArgs(
        name=name,
        d_model=d_model,
        n_layers=int(config["n_layers"]),
        n_heads=int(config["n_heads"]),
        n_experts=int(config["moe_num_experts"]),
        expert_hidden=int(hidden) // 2,
        top_k=int(config["moe_top_k"]),
        vocab_size=int(config["vocab_size"]),
        embedding_size=int(config["embedding_size"]),
        additional_vocab_size=int(config.get("additional_vocab_size") or 0),
        projector_hidden=int(hidden) // 2,
        rope_theta=float(config.get("rope_theta", 10000.0)),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        max_crops=int(config.get("max_crops", 12)),
        max_seq_len=int(config.get("max_sequence_length", 4096)),
        vision=vision,
    )
