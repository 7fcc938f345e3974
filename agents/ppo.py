"""PPO and MaskablePPO controllers: a Stable-Baselines3 actor-critic policy as a `Controller`.

Both see the log-scaled observation (`agents.features.ScaledObservation`) through SB3's
`MultiInputPolicy` (the family one-hot, the budget, the prompt and image features).

- `ppo`: stable-baselines3 `PPO` on the env's own `MultiDiscrete([7, 4, 5])` action: one
  categorical head per knob (the knobs are chosen independently given the request).
- `maskable_ppo`: sb3-contrib `MaskablePPO` on the flattened `Discrete(140)` action
  (`DiscreteKnobs`), masked by the latency guardrail (`agents.guardrail.LatencyGuardrail`): the
  policy only ever considers configurations whose profiled latency fits the request's budget, in
  training (the env's `action_masks()`) and at decision time (`guardrail.masks`, on the raw budget fraction).

Deciding does not go through SB3's `predict` (which converts, checks and reshapes per call): it
scales the batch, runs the policy's feature extractor, actor MLP and action head, and takes the
argmax of the logits (per knob for `ppo`; over the allowed configurations for `maskable_ppo`),
which is the distribution's mode, i.e. `deterministic=True`. For the MLP policies the trainers
build (Linear + tanh/ReLU layers over SB3's `CombinedExtractor`) that forward runs in NumPy on
views of the live weights (`agents.numpy_mlp`; with the views and the input layout kept between
decisions, 54 -> 20 us per batch-1 `select_config` on our CPU, experiment M3). Any
other architecture takes the torch path; both are tested equal to SB3's `predict`.

Saving writes the policy's `state_dict` (safetensors) and a JSON config (net_arch, activation,
the maskable flag, the guardrail's quantile; its predicted-latency table goes with the tensors).
Loading rebuilds the SB3 policy class from `scaled_observation_space()` and the grid's action
space, with a dummy learning-rate schedule: no env, no pickle, and the same decisions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from flexvlm_env.config import KnobGrid

from .base import Controller, is_single_observation
from .features import (N_SCALED, SCALED_VECTOR_SLICES, scale_observation, scaled_observation_space, scaled_parts,
                       scaled_vector_one)
from .guardrail import LatencyGuardrail, optional_guardrail_from_state, optional_guardrail_state
from .numpy_mlp import LiveLayers, forward

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU,
                                           "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}
POLICY_PREFIX = "policy."


def policy_kwargs(net_arch: Sequence[int] | Mapping[str, Sequence[int]] = (64, 64), activation: str = "tanh",
                  share_features_extractor: bool = True) -> dict[str, Any]:
    """JSON-serialisable policy kwargs (what `save` records); `sb3_policy_kwargs` turns them into
    the kwargs SB3's policy classes take."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not known; allowed: {sorted(ACTIVATIONS)}")
    if isinstance(net_arch, Mapping):
        arch: Any = {key: [int(n) for n in net_arch[key]] for key in ("pi", "vf")}
        sizes = arch["pi"] + arch["vf"]
    else:
        arch = [int(n) for n in net_arch]
        sizes = arch
    if any(n < 1 for n in sizes):
        raise ValueError(f"net_arch={net_arch!r}: layer sizes must be >= 1")
    return {"net_arch": arch, "activation": activation, "share_features_extractor": bool(share_features_extractor)}


def sb3_policy_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """SB3 policy kwargs (activation class, lists) from `policy_kwargs`' JSON form."""
    arch = config["net_arch"]
    return {
        "net_arch": dict(arch) if isinstance(arch, Mapping) else list(arch),
        "activation_fn": ACTIVATIONS[config["activation"]],
        "share_features_extractor": config.get("share_features_extractor", True),
    }


def policy_class(maskable: bool) -> type:
    if maskable:
        from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy

        return MaskableMultiInputActorCriticPolicy
    from stable_baselines3.common.policies import MultiInputActorCriticPolicy

    return MultiInputActorCriticPolicy


def action_space(grid: KnobGrid, maskable: bool) -> spaces.Space:
    """The action space the policy acts in: Discrete(140) (maskable) or MultiDiscrete([7, 4, 5])."""
    if maskable:
        return spaces.Discrete(len(grid))
    return spaces.MultiDiscrete(np.array(grid.shape, dtype=np.int64))


# Index in (family, *scaled_parts(...)) of each observation key.
SCALED_PARTS = {"family": 0, "budget_fraction": 1, "budget_ms": 2, "prompt": 3, "image": 4}


class NumpyActor:
    """The policy's actor (MLP and action head) in NumPy (`agents.numpy_mlp.LiveLayers`) with the
    input layout of SB3's CombinedExtractor, or `layers() is None` when the policy is not a plain
    MLP over that extractor (then the torch path decides)."""

    def __init__(self, policy: nn.Module):
        from stable_baselines3.common.torch_layers import CombinedExtractor

        self.policy = policy
        self.live = None
        if isinstance(policy.pi_features_extractor, CombinedExtractor):
            self.live = LiveLayers([*policy.mlp_extractor.policy_net, policy.action_net])
        # CombinedExtractor concatenates its sub-extractors in the order of its ModuleDict; a
        # Discrete one is one-hot (SB3's preprocess_obs): a row of an identity table here.
        self.layout: list[tuple[int, int, int, np.ndarray | None]] = []  # (part, start, stop, one-hot table)
        # batch 1: the input row gathered from [scaled_vector_one, the family's one-hot row] by one index
        gather: list[int] = []
        self._one_hot = np.zeros((policy.observation_space["family"].n, 0), dtype=np.float32)  # a policy without it
        start = 0
        for key in policy.pi_features_extractor.extractors:
            space = policy.observation_space[key]
            if key not in SCALED_PARTS:
                raise ValueError(f"policy reads observation key {key!r}; the controller knows {sorted(SCALED_PARTS)}")
            width = int(space.n) if isinstance(space, spaces.Discrete) else int(np.prod(space.shape))
            table = np.eye(width, dtype=np.float32) if isinstance(space, spaces.Discrete) else None
            self.layout.append((SCALED_PARTS[key], start, start + width, table))
            if table is not None:
                self._one_hot = table
                gather += range(N_SCALED, N_SCALED + width)
            else:
                gather += range(N_SCALED)[SCALED_VECTOR_SLICES[key]]
            start += width
        self.width = start
        self._gather = np.array([gather], dtype=np.int64)  # [1, width]

    def layers(self) -> list | None:
        return self.live.get() if self.live is not None else None

    def inputs(self, observations: Mapping[str, np.ndarray]) -> np.ndarray:
        """float32 [B, width]: the extractor's output for a batch of raw observations."""
        family = np.asarray(observations["family"], dtype=np.int64).reshape(-1)
        parts = (family, *scaled_parts(observations))
        x = np.empty((len(family), self.width), dtype=np.float32)
        for part, start, stop, table in self.layout:
            x[:, start:stop] = parts[part] if table is None else table[parts[part]]
        return x

    def inputs_one(self, observation: Mapping[str, np.ndarray], scaled: np.ndarray | None = None) -> np.ndarray:
        """float32 [1, width]: `inputs` of one env observation, without building a batch of it (`scaled`: its
        `scaled_vector_one`, if the caller has it): the same values from about eight NumPy calls."""
        if scaled is None:
            scaled = scaled_vector_one(observation)
        return np.concatenate((scaled, self._one_hot[int(observation["family"])]))[self._gather]


def build_policy(maskable: bool, config: Mapping[str, Any], grid: KnobGrid) -> nn.Module:
    """A fresh SB3 policy of the saved architecture, without an env (lr schedule: a dummy)."""
    cls = policy_class(maskable)
    return cls(scaled_observation_space(), action_space(grid, maskable), lambda _: 0.0, **sb3_policy_kwargs(config))


class PPOController(Controller):
    """An SB3 actor-critic policy deciding deterministically (see the module docstring).

    Args:
        policy: the SB3 policy (`model.policy` of a `PPO` / `MaskablePPO` with `MultiInputPolicy`
            on the scaled observation); the controller reads it live, so a controller made
            before or during training decides with the current weights.
        policy_config: `policy_kwargs(...)` the policy was built with (recorded by `save`).
        maskable: True for a MaskablePPO policy over the flat `Discrete(len(grid))` action.
        guardrail: the latency guardrail whose masks a maskable policy decides under (required
            when `maskable`; ignored otherwise).
        grid: the knob grid (default 7x4x5).
    """

    kind = "ppo"

    def __init__(self, policy: nn.Module, policy_config: Mapping[str, Any], maskable: bool = False,
                 guardrail: LatencyGuardrail | None = None, grid: KnobGrid | None = None):
        super().__init__(grid)
        self.maskable = bool(maskable)
        self.kind = "maskable_ppo" if self.maskable else "ppo"  # what `save` records
        if self.maskable and guardrail is None:
            raise ValueError("maskable=True needs the guardrail its masks come from (guardrail=LatencyGuardrail...)")
        expected = action_space(self.grid, self.maskable)
        if getattr(policy, "action_space", None) != expected:
            raise ValueError(f"policy acts in {getattr(policy, 'action_space', None)}, expected {expected} "
                             f"({'maskable: the flat config index' if self.maskable else 'the knob indices'})")
        self.policy = policy
        self.policy_config = dict(policy_config)
        self.guardrail = guardrail if self.maskable else None
        self._nvec = tuple(int(n) for n in self.grid.shape)
        self._actor: NumpyActor | None = None  # built on the first decision, for the policy then assigned

    def logits(self, observations: Mapping[str, np.ndarray]) -> np.ndarray:
        """float32 [B, n_logits] action logits for a batch of raw observations (`as_batch`):
        [B, 140] for maskable, [B, 7 + 4 + 5] (one block per knob) otherwise."""
        layers = self._numpy_actor().layers()
        if layers is None:
            return self.torch_logits(observations)
        return forward(layers, self._actor.inputs(observations))

    def _numpy_actor(self) -> NumpyActor:
        if self._actor is None or self._actor.policy is not self.policy:
            self._actor = NumpyActor(self.policy)
        return self._actor

    @torch.inference_mode()
    def torch_logits(self, observations: Mapping[str, np.ndarray]) -> np.ndarray:
        """`logits` through the policy's own torch modules (any architecture; the reference)."""
        from stable_baselines3.common.preprocessing import preprocess_obs

        scaled = scale_observation(observations)
        policy = self.policy
        obs = {key: torch.as_tensor(np.asarray(value)) for key, value in scaled.items()}
        obs["family"] = obs["family"].reshape(-1)
        features = policy.pi_features_extractor(preprocess_obs(obs, policy.observation_space, normalize_images=False))
        latent = policy.mlp_extractor.forward_actor(features)
        return policy.action_net(latent).numpy()

    def select_indices(self, observations: Mapping[str, np.ndarray]) -> np.ndarray:
        logits = self.logits(observations)
        if self.maskable:
            masks = self.guardrail.masks(observations["family"], observations["budget_fraction"])  # raw (unscaled)
            return np.where(masks, logits, -np.inf).argmax(axis=1).astype(np.int64)
        n0, n1, n2 = self._nvec
        i = logits[:, :n0].argmax(axis=1)
        j = logits[:, n0:n0 + n1].argmax(axis=1)
        k = logits[:, n0 + n1:].argmax(axis=1)
        return ((i * n1 + j) * n2 + k).astype(np.int64)

    def select_index(self, observation: Mapping[str, Any]) -> int:
        # One env observation (the protocol's batch-1 call, M3's decision time): the same arithmetic on
        # [1, n] rows without making a batch first (as_batch, batched scaling and masks are most of the
        # NumPy calls of a 30 us decision). Batches, missing keys and non-NumPy policies take the batch path.
        if not is_single_observation(observation):
            return super().select_index(observation)
        actor = self._numpy_actor()
        layers = actor.layers()
        if layers is None:
            return super().select_index(observation)
        scaled = scaled_vector_one(observation)
        logits = forward(layers, actor.inputs_one(observation, scaled))[0]
        if self.maskable:
            fraction = float(scaled[0])  # the budget fraction rounded to float32, as the batch path rounds it
            return self.guardrail.argmax_allowed(int(observation["family"]), fraction, logits)
        n0, n1, n2 = self._nvec
        return int((logits[:n0].argmax() * n1 + logits[n0:n0 + n1].argmax()) * n2 + logits[n0 + n1:].argmax())

    # -- serialization -------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        # Cloned: with a shared feature extractor the state_dict names one module three times
        # (features_extractor, pi_/vf_features_extractor), and safetensors refuses aliased tensors.
        tensors = {POLICY_PREFIX + key: value.detach().cpu().clone() for key, value in self.policy.state_dict().items()}
        guardrail_config, guardrail_tensors = optional_guardrail_state(self.guardrail)
        config: dict[str, Any] = {"maskable": self.maskable, "policy_kwargs": self.policy_config, "guardrail": guardrail_config}
        return config, {**tensors, **guardrail_tensors}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], grid: KnobGrid) -> PPOController:
        maskable = bool(config["maskable"])
        policy = build_policy(maskable, config["policy_kwargs"], grid)
        weights = {key[len(POLICY_PREFIX):]: value for key, value in tensors.items() if key.startswith(POLICY_PREFIX)}
        policy.load_state_dict(weights, strict=True)
        policy.set_training_mode(False)
        guardrail = optional_guardrail_from_state(config.get("guardrail"), tensors)
        return cls(policy, config["policy_kwargs"], maskable, guardrail, grid)
