"""Arguments shared by the methods whose controller is a tiny causal LM (`dpo`, `grpo`)."""
from __future__ import annotations

from dataclasses import dataclass

from agents.lm import DEFAULT_BUCKETS

from .common import CommonArgs


@dataclass
class LMArgs(CommonArgs):
    format_warmup_steps: int = 300
    """steps of the format warm start (random valid answers; 0 turns it off)"""
    hidden_size: int = 64
    """LM hidden size"""
    num_layers: int = 2
    """LM decoder layers"""
    num_heads: int = 4
    """LM attention heads"""
    intermediate_size: int = 128
    """LM MLP width"""
    n_buckets: int = DEFAULT_BUCKETS
    """buckets per observation feature in the text rendering"""
    torch_threads: int = 1
    """PyTorch CPU threads (a model this small gains little from more; on shared cores more threads can be far slower)"""

    def validate(self) -> None:
        super().validate()
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "n_buckets", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be >= 1")
        if self.format_warmup_steps < 0:
            raise ValueError(f"--format-warmup-steps={self.format_warmup_steps!r} must be >= 0")
