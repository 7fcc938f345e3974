"""Vision tower: CLIP-style ViT, 2x2 attention pooling and the MLP projector.

Module and parameter names mirror the official MolmoE checkpoint (`model.vision_backbone.*`), so
a real checkpoint loads without renaming. Crops are independent, so the crops of every image in a
batch are concatenated and run together; no crop padding is ever needed. Only the ViT blocks up
to the deepest layer whose features are used run (22 of 23 for MolmoE-1B).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs, VisionArgs
from . import vision_kernels
from .vision_kernels import add_layer_norm_auto, quick_gelu_auto


class ViTAttention(nn.Module):
    def __init__(self, vision: VisionArgs):
        super().__init__()
        inner = vision.n_heads * vision.head_dim
        self.n_heads, self.head_dim = vision.n_heads, vision.head_dim
        self.wq = nn.Linear(vision.width, inner)
        self.wk = nn.Linear(vision.width, inner)
        self.wv = nn.Linear(vision.width, inner)
        self.wo = nn.Linear(inner, vision.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (proj(x).view(n, length, self.n_heads, self.head_dim).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(n, length, -1))


class ViTMLP(nn.Module):
    def __init__(self, vision: VisionArgs):
        super().__init__()
        self.w1 = nn.Linear(vision.width, vision.mlp_dim)
        self.w2 = nn.Linear(vision.mlp_dim, vision.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # quick_gelu, as CLIP was trained: one Triton kernel on CUDA at inference, torch's three otherwise
        return self.w2(quick_gelu_auto(self.w1(x)))


class ViTBlock(nn.Module):
    def __init__(self, vision: VisionArgs):
        super().__init__()
        self.attention_norm = nn.LayerNorm(vision.width, eps=vision.norm_eps)
        self.attention = ViTAttention(vision)
        self.ffn_norm = nn.LayerNorm(vision.width, eps=vision.norm_eps)
        self.feed_forward = ViTMLP(vision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _Blocks(nn.Module):
    def __init__(self, vision: VisionArgs):
        super().__init__()
        self.resblocks = nn.ModuleList(ViTBlock(vision) for _ in range(vision.n_layers))


class VisionTransformer(nn.Module):
    def __init__(self, vision: VisionArgs):
        super().__init__()
        self.vision = vision
        self.patch_embedding = nn.Linear(vision.patch_dim, vision.width, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(vision.width))
        self.positional_embedding = nn.Parameter(torch.zeros(vision.patches_per_crop + 1, vision.width))
        self.pre_ln = nn.LayerNorm(vision.width, eps=vision.norm_eps)
        self.transformer = _Blocks(vision)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[crops, patches, patch_dim] -> concatenated features of the chosen layers [crops, patches, 2W]."""
        x = self.patch_embedding(patches)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.pre_ln(x)
        n_layers = self.vision.n_layers
        wanted = [layer % n_layers for layer in self.vision.vit_layers]
        blocks = self.transformer.resblocks[: self.vision.layers_to_run]
        outputs = {}
        if fused_add_norm_ok(x, self.pre_ln.weight):
            # The same blocks with each residual add and the LayerNorm after it as one kernel
            # (vision_kernels.add_layer_norm): `normed` is what the next sublayer reads.
            normed = blocks[0].attention_norm(x)
            for i, block in enumerate(blocks):
                normed, x = add_layer_norm_auto(block.attention(normed), x, block.ffn_norm)
                update = block.feed_forward(normed)
                if i + 1 < len(blocks):
                    normed, x = add_layer_norm_auto(update, x, blocks[i + 1].attention_norm)
                else:
                    x = x + update
                if i in wanted:
                    outputs[i] = x
        else:
            for i, block in enumerate(blocks):
                x = block(x)
                if i in wanted:
                    outputs[i] = x
        return torch.cat([outputs[i][:, 1:] for i in wanted], dim=-1)


def fused_add_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the ViT takes the fused residual add + LayerNorm path: on CUDA with Triton, for widths one
    program holds, unless autograd needs the result (the kernel has no backward) or autocast is on (the kernel
    does not cast: a bf16-autocast forward without gradients, e.g. finetune_lora.py's anchor reference, would hand
    it a bf16 update and a float32 residual); CPU, training and wider towers keep the blocks as written."""
    return (x.is_cuda and vision_kernels.triton is not None and x.shape[-1] <= vision_kernels.MAX_WIDTH
            and not torch.is_autocast_enabled(x.device.type)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class AttentionPool2d(nn.Module):
    """2x2 "attention-meanq" pooling: the window mean queries the window's four vectors."""

    def __init__(self, vision: VisionArgs):
        super().__init__()
        in_dim = vision.width * len(vision.vit_layers)
        inner = vision.n_heads * vision.head_dim
        self.n_heads, self.head_dim, self.pool = vision.n_heads, vision.head_dim, vision.pool
        self.wq = nn.Linear(in_dim, inner)
        self.wk = nn.Linear(in_dim, inner)
        self.wv = nn.Linear(in_dim, inner)
        self.wo = nn.Linear(inner, vision.width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        crops, patches, dim = features.shape
        side, p = int(round(patches**0.5)), self.pool
        pooled = side // p
        windows = (
            features.view(crops, pooled, p, pooled, p, dim)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(crops * pooled * pooled, p * p, dim)
        )
        query = windows.mean(dim=1, keepdim=True)
        heads = lambda t: t.view(t.shape[0], t.shape[1], self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.wq(query)), heads(self.wk(windows)), heads(self.wv(windows))
        # One query over p*p = 4 keys per window, written out: a fused attention kernel gains
        # nothing here, and cuDNN's rejects the ~10^5 windows of a training batch.
        weights = torch.softmax((q.float() * k.float()).sum(-1) / self.head_dim**0.5, dim=-1)  # [W, heads, 4]
        out = (weights[..., None] * v.float()).sum(dim=-2).to(v.dtype)  # [W, heads, hd]
        out = self.wo(out.reshape(out.shape[0], 1, -1))
        return out.view(crops, pooled * pooled, -1)


class Projector(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.vision.width, args.projector_hidden, bias=False)
        self.w3 = nn.Linear(args.vision.width, args.projector_hidden, bias=False)
        self.w2 = nn.Linear(args.projector_hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    """ViT + padding embeddings + pooling (the "vision encoder" stage) and the projector stage."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.image_vit = VisionTransformer(args.vision)
        self.image_pooling_2d = AttentionPool2d(args.vision)
        self.image_projector = Projector(args)
        self.pad_embed = nn.Parameter(torch.zeros(2, args.vision.width * len(args.vision.vit_layers)))

    def encode(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """Pixels [crops, patches, patch_dim] + masks [crops, patches] -> pooled features [crops, cells, W]."""
        features = self.image_vit(images)
        fully_padded = (image_masks == 0).to(features.dtype)[..., None]
        # Any value other than 0 and 1 (partial padding, and the -1 row of the shifted masks).
        partially_padded = ((image_masks < 1) & (image_masks != 0)).to(features.dtype)[..., None]
        pad = self.pad_embed.to(features.dtype)
        features = features + fully_padded * pad[0] + partially_padded * pad[1]
        return self.image_pooling_2d(features)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.image_projector(pooled)
