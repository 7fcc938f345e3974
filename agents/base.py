"""The one protocol every controller and baseline implements, and its pickle-free serialization.

A controller maps an observation of a FlexVLM environment (the single-level Dict: family,
budget_ms, budget_fraction, prompt and image features) to a configuration of the three knobs.
`select_indices` is the batched primitive (a batch of observations, as a vector env returns them,
to config indices, row-major in `grid.configs()`); `select_config` / `select_action` are the
batch-1 conveniences built on it. `save` writes a directory with `controller.json` (the kind, the
grid and the controller's JSON config) and, when the controller has tensors, `weights.safetensors`;
`load_controller` reads one back without unpickling anything.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexvlm_env.config import Config, KnobGrid

CONTROLLER_FILE = "controller.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
OBSERVATION_KEYS = ("budget_fraction", "budget_ms", "family", "image", "prompt")

# kind -> "module:Class". Imported lazily, so loading a LUT never imports TRL or SB3.
CONTROLLER_CLASSES: dict[str, str] = {
    "lut": "agents.lut:LUTController",
    "supervised": "agents.supervised:SupervisedController",
    "ppo": "agents.ppo:PPOController",
    "maskable_ppo": "agents.ppo:PPOController",
    "dpo": "agents.lm:LMController",
    "grpo": "agents.lm:LMController",
    "random": "agents.base:RandomController",
    "baseline": "baselines.knobs:KnobPathController",
    "online_margin": "agents.online:OnlineMarginController",
}


def as_batch(observation: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A batch (leading axis) of observations: a single env's observation becomes a batch of one,
    a vector env's batched observation is returned as arrays. Missing keys are an error."""
    missing = [key for key in OBSERVATION_KEYS if key not in observation]
    if missing:
        raise ValueError(f"observation is missing {missing}; a FlexVLM observation has keys {list(OBSERVATION_KEYS)}")
    family = np.asarray(observation["family"], dtype=np.int64)
    if family.ndim == 0:
        return {
            "family": family.reshape(1),
            "budget_ms": np.asarray(observation["budget_ms"], dtype=np.float32).reshape(1, 1),
            "budget_fraction": np.asarray(observation["budget_fraction"], dtype=np.float32).reshape(1, 1),
            "prompt": np.asarray(observation["prompt"], dtype=np.float32).reshape(1, -1),
            "image": np.asarray(observation["image"], dtype=np.float32).reshape(1, -1),
        }
    n = len(family)
    return {
        "family": family,
        "budget_ms": np.asarray(observation["budget_ms"], dtype=np.float32).reshape(n, 1),
        "budget_fraction": np.asarray(observation["budget_fraction"], dtype=np.float32).reshape(n, 1),
        "prompt": np.asarray(observation["prompt"], dtype=np.float32).reshape(n, -1),
        "image": np.asarray(observation["image"], dtype=np.float32).reshape(n, -1),
    }


def is_single_observation(observation: Mapping[str, Any]) -> bool:
    """True for one env observation with every key (a scalar family): what the controllers' batch-1 paths
    take; a batch, or an observation missing keys (the batch path names them), is not."""
    return all(key in observation for key in OBSERVATION_KEYS) and np.ndim(observation["family"]) == 0


def stack_observations(observations: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """One batch from a list of single-env observations."""
    if not observations:
        raise ValueError("observations is empty; at least one observation is needed")
    batches = [as_batch(o) for o in observations]
    return {key: np.concatenate([b[key] for b in batches]) for key in OBSERVATION_KEYS}


def grid_to_json(grid: KnobGrid) -> dict:
    return {"crops": list(grid.crops), "top_k": list(grid.top_k), "active_blocks": list(grid.active_blocks)}


def grid_from_json(data: Mapping[str, Any]) -> KnobGrid:
    return KnobGrid(crops=tuple(data["crops"]), top_k=tuple(data["top_k"]), active_blocks=tuple(data["active_blocks"]))


class Controller(ABC):
    """Chooses a configuration per request (see the module docstring).

    Subclasses set `kind`, implement `select_indices`, and, to be saved, `state()` (JSON config,
    tensors) and `from_state(config, tensors, grid)`.
    """

    kind: ClassVar[str] = ""

    def __init__(self, grid: KnobGrid | None = None):
        self.grid = grid or KnobGrid()
        self._configs = self.grid.configs()
        self._actions = np.stack(np.unravel_index(np.arange(len(self.grid)), self.grid.shape), axis=1).astype(np.int64)

    @abstractmethod
    def select_indices(self, observations: Mapping[str, np.ndarray]) -> np.ndarray:
        """int64 [B] config indices for a batch of observations (see `as_batch`)."""

    def select_index(self, observation: Mapping[str, Any]) -> int:
        return int(self.select_indices(as_batch(observation))[0])

    def select_config(self, observation: Mapping[str, Any]) -> Config:
        """The configuration for one request (the protocol's batch-1 call)."""
        return self._configs[self.select_index(observation)]

    def select_action(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The env's MultiDiscrete action (knob indices); a batch gives [B, 3]."""
        batch = as_batch(observation)
        indices = self.select_indices(batch)
        return self._actions[indices] if np.ndim(observation["family"]) else self._actions[indices[0]].copy()

    # -- serialization -------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-serialisable config, tensors) that `from_state` rebuilds the controller from."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], grid: KnobGrid) -> Controller:
        raise NotImplementedError(f"{cls.__name__} cannot be loaded")

    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the controller to directory `path` (atomically: a crash leaves the old one)."""
        path = Path(path)
        config, tensors = self.state()
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        record = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "grid": grid_to_json(self.grid),
            "config": config,
            "metadata": dict(metadata or {}),
        }
        (tmp / CONTROLLER_FILE).write_text(json.dumps(record, indent=1))
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Controller:
        return load_controller(path)


def load_controller(path: str | Path) -> Controller:
    """A controller saved with `Controller.save` (any kind)."""
    path = Path(path)
    record_path = path / CONTROLLER_FILE
    if not record_path.exists():
        raise FileNotFoundError(f"no saved controller in {path} (missing {CONTROLLER_FILE})")
    record = json.loads(record_path.read_text())
    kind = record.get("kind")
    if kind not in CONTROLLER_CLASSES:
        raise ValueError(f"{record_path}: kind={kind!r} is not known; allowed: {sorted(CONTROLLER_CLASSES)}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{record_path}: format_version={record.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    module, name = CONTROLLER_CLASSES[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    weights = path / WEIGHTS_FILE
    tensors = load_file(str(weights)) if weights.exists() else {}
    return cls.from_state(record["config"], tensors, grid_from_json(record["grid"]))


class RandomController(Controller):
    """Uniformly random configurations (the floor every learned controller must clear)."""

    kind = "random"

    def __init__(self, grid: KnobGrid | None = None, seed: int = 0):
        super().__init__(grid)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def select_indices(self, observations):
        return self._rng.integers(0, len(self.grid), size=len(observations["family"]))

    def state(self):
        return {"seed": self.seed}, {}

    @classmethod
    def from_state(cls, config, tensors, grid):
        return cls(grid, seed=config["seed"])
