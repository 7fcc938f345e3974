"""Batch-1 decisions of small torch MLPs in NumPy.

A controller's decision must stay well under 1% of the request it controls (experiment M3). For
the few-layer MLPs our controllers use, a dozen tiny torch ops cost tens of microseconds of
dispatch at batch 1, several times the arithmetic; NumPy on zero-copy views of the same parameters
does the arithmetic alone. Views, not copies: a controller made before or during training decides
with the current weights. Anything but Linear/Tanh/ReLU layers returns None and the caller keeps
its torch path (the reference the tests compare against). `LiveLayers` keeps the views between
decisions (building them is a third of a batch-1 decision) and rebuilds them when a parameter
moves to new memory (a device or dtype change; optimizer steps and `load_state_dict` write in place).
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


class LiveLayers:
    """`numpy_layers(modules)`, cached until one of the modules' parameters changes its memory."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.modules = list(modules)
        self._key: tuple[int, ...] | None = None
        self._layers: list[Layer] | None = None

    def get(self) -> list[Layer] | None:
        # Read from the modules each time (not kept): a Parameter replaced by assignment or by
        # `load_state_dict(..., assign=True)` is new memory too. `_parameters` is the module's own
        # registry; `module.weight` goes through `Module.__getattr__`, four times slower here.
        key = tuple(p.data_ptr() for m in self.modules for p in m._parameters.values() if p is not None)
        if key != self._key:
            self._layers, self._key = numpy_layers(self.modules), key
        return self._layers


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
