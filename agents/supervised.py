"""Supervised: a small MLP classifier over the 140 configurations, trained on oracle labels.

The oracle label of a (request, budget) is the set of configurations with the request's best
profiled quality among those meeting its budget (`ProfileTables.oracle_targets`); the network
learns to predict it from what the env shows (`agents.features.observation_features`) with a
soft-target cross-entropy. At decision time the configurations the latency guardrail rules out
for the budget are masked before the argmax, so a confident but slow guess cannot blow the budget.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flexvlm_env.config import KnobGrid

from .base import Controller
from .features import N_FEATURES, observation_features
from .guardrail import LatencyGuardrail, optional_guardrail_from_state, optional_guardrail_state
from .numpy_mlp import LiveLayers, forward
from .profiles import ProfileTables


def make_mlp(n_configs: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = N_FEATURES
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_configs))
    return nn.Sequential(*layers)


def oracle_dataset(profiles: ProfileTables, budget_fractions: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, N_FEATURES], target distributions [N, C]) for every profiled request at
    every budget fraction."""
    features, targets = [], []
    for fraction in budget_fractions:
        observations = profiles.observations(float(fraction))
        features.append(observation_features(observations))
        targets.append(profiles.oracle_targets(observations["budget_ms"].reshape(-1).astype(np.float64)))
    return torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(targets))


class SupervisedController(Controller):
    kind = "supervised"

    def __init__(self, net: nn.Module, hidden: Sequence[int], guardrail: LatencyGuardrail | None,
                 grid: KnobGrid | None = None):
        super().__init__(grid)
        self.net = net.eval()
        self._live: LiveLayers | None = None  # NumPy views of `net`, built on the first decision
        self.hidden = list(hidden)
        self.guardrail = guardrail

    @classmethod
    def create(cls, profiles: ProfileTables, hidden: Sequence[int] = (128, 128), guardrail: bool = True,
               seed: int = 0) -> SupervisedController:
        torch.manual_seed(seed)
        net = make_mlp(len(profiles.grid), hidden)
        return cls(net, hidden, LatencyGuardrail.from_profiles(profiles) if guardrail else None, profiles.grid)

    def train_epochs(self, features: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                     epochs: int, batch_size: int, generator: torch.Generator) -> float:
        """Minibatch soft-target cross-entropy; returns the last epoch's mean loss."""
        self.net.train()
        loss_sum = 0.0
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            loss_sum, batches = 0.0, 0
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                loss = -(targets[rows] * torch.log_softmax(self.net(features[rows]), dim=1)).sum(dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach())
                batches += 1
            loss_sum /= max(batches, 1)
        self.net.eval()
        return loss_sum

    def select_indices(self, observations):
        logits = self.logits(observations)
        if self.guardrail is not None:
            allowed = self.guardrail.masks(observations["family"], observations["budget_fraction"])
            logits = np.where(allowed, logits, -np.inf)
        return logits.argmax(axis=1)

    def logits(self, observations) -> np.ndarray:
        """float32 [B, n_configs]: the MLP in NumPy on views of its live weights (`agents.numpy_mlp`;
        batch-1 decisions are dispatch-bound in torch), or through torch for other module types."""
        if self._live is None or self._live.modules != list(self.net):
            self._live = LiveLayers(self.net)
        layers = self._live.get()
        if layers is None:
            return self.torch_logits(observations)
        return forward(layers, observation_features(observations))

    @torch.inference_mode()
    def torch_logits(self, observations) -> np.ndarray:
        return self.net(torch.from_numpy(observation_features(observations))).numpy()

    def state(self):
        guardrail_config, guardrail_tensors = optional_guardrail_state(self.guardrail)
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        return {"hidden": self.hidden, "guardrail": guardrail_config}, {**tensors, **guardrail_tensors}

    @classmethod
    def from_state(cls, config, tensors, grid):
        net = make_mlp(len(grid), config["hidden"])
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
        guardrail = optional_guardrail_from_state(config["guardrail"], tensors)
        return cls(net, config["hidden"], guardrail, grid)


__all__ = ["SupervisedController", "oracle_dataset", "make_mlp"]
