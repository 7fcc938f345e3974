"""Batch-1 decisions of small torch MLPs in NumPy.

A controller's decision must stay well under 1% of the request it controls (experiment M3). For
the few-layer MLPs our controllers use, a dozen tiny torch ops cost tens of microseconds of
dispatch at batch 1, several times the arithmetic; NumPy on zero-copy views of the same parameters
does the arithmetic alone. Views, not copies: a controller made before or during training decides
with the current weights. Anything but Linear/Tanh/ReLU layers returns None and the caller keeps
its torch path (the reference the tests compare against).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch import nn

Layer = tuple[str, "np.ndarray | None", "np.ndarray | None"]


def numpy_layers(modules: Iterable[nn.Module]) -> list[Layer] | None:
    """(kind, weight, bias) NumPy views of a sequence of Linear / Tanh / ReLU modules, or None."""
    layers: list[Layer] = []
    for module in modules:
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            bias = module.bias.detach().numpy() if module.bias is not None else np.float32(0.0)
            layers.append(("linear", module.weight.detach().numpy(), bias))
        elif isinstance(module, nn.Tanh):
            layers.append(("tanh", None, None))
        elif isinstance(module, nn.ReLU):
            layers.append(("relu", None, None))
        else:
            return None
    return layers


def forward(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """float32 [B, out] from float32 [B, in] through `numpy_layers(...)`."""
    for kind, weight, bias in layers:
        if kind == "linear":
            x = x @ weight.T + bias
        elif kind == "tanh":
            x = np.tanh(x)
        else:
            x = np.maximum(x, 0.0)
    return x
