"""The MolmoE module tree: `model.vision_backbone`, `model.transformer`, `lm_head`.

The tree mirrors the official checkpoint's state-dict paths so that loading is a name-for-name
copy (plus stacking each block's experts). `init_random_` draws seeded random weights for latency
studies and tests; such a model is flagged so that quality numbers are never taken from it by
accident.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .args import ModelArgs
from .decoder import Transformer
from .vision import VisionBackbone


class _Inner(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.transformer = Transformer(args)
        self.vision_backbone = VisionBackbone(args)


class MolmoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = _Inner(args)
        self.lm_head = nn.Linear(args.d_model, args.embedding_size, bias=False)

    @property
    def transformer(self) -> Transformer:
        return self.model.transformer

    @property
    def vision_backbone(self) -> VisionBackbone:
        return self.model.vision_backbone

    @torch.no_grad()
    def init_random_(self, seed: int = 0) -> "MolmoE":
        """Seeded random weights: N(0, 1/fan_in) matrices, unit-ish norm gains, small biases.

        The router is scaled up so that expert choices are clear-cut, as in a trained MoE; otherwise
        near-uniform router probabilities would make routing (and thus top_k) meaningless.
        """
        generators: dict[torch.device, torch.Generator] = {}
        for name, param in self.named_parameters():
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            generator = generators[param.device]
            shape = param.shape
            if name.endswith("mlp.gate.weight"):
                std = 4.0 / math.sqrt(shape[-1])
            elif param.dim() >= 2:
                std = 1.0 / math.sqrt(shape[-1])
            elif "norm" in name or "_ln" in name:
                param.copy_(1.0 + 0.1 * torch.randn(shape, generator=generator, device=param.device))
                continue
            else:
                std = 0.02
            if name.endswith(("wte.embedding", "wte.new_embedding")):
                std = 1.0
            # Drawn on the parameter's device (7B values on a CPU would take a minute); the stream
            # is reproducible per device type, not across CPU and GPU.
            param.copy_(torch.randn(shape, generator=generator, device=param.device, dtype=torch.float32) * std)
        return self
