"""The one protocol every controller and baseline implements, and its pickle-free serialization.

A controller maps an observation of a FlexVLM environment (the single-level Dict: family,
budget_ms, budget_fraction, prompt and image features) to a configuration of the three knobs.
`select_indices` is the batched primitive (a batch of observations, as a vector env returns them,
to config indices, row-major in `grid.configs()`); `select_config` / `select_action` are the
batch-1 conveniences built on it. Observations outside the env's observation space (a family that
is no index of FAMILY_NAMES, a NaN budget, feature vectors of another length) are refused before a
controller indexes a table with them. `save` writes a directory with `controller.json` (the kind,
the grid and the controller's JSON config) and, when the controller has tensors,
`weights.safetensors`; `load_controller` reads one back without unpickling anything.
"""
from __future__ import annotations

import importlib
import json
import operator
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexvlm_env.config import Config, KnobGrid
from flexvlm_env.envs.core import make_observation_space

CONTROLLER_FILE = "controller.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
OBSERVATION_KEYS = ("budget_fraction", "budget_ms", "family", "image", "prompt")
RECORD_KEYS = ("kind", "format_version", "grid", "config")

_OBSERVATION_SPACE = make_observation_space()
FAMILY_COUNT = int(_OBSERVATION_SPACE["family"].n)
_BOX_KEYS = ("budget_ms", "budget_fraction", "prompt", "image")  # the order of an `as_batch` dict
_BOX_BOUNDS = {key: (_OBSERVATION_SPACE[key].low.reshape(-1), _OBSERVATION_SPACE[key].high.reshape(-1)) for key in _BOX_KEYS}
# The bounds of all Box keys side by side, as Python floats: one observation's check (`_valid_single`).
_BOX_SHAPES = tuple((key, _BOX_BOUNDS[key][0].shape) for key in _BOX_KEYS)
_LOW_LIST = [bound for key in _BOX_KEYS for bound in _BOX_BOUNDS[key][0].tolist()]
_HIGH_LIST = [bound for key in _BOX_KEYS for bound in _BOX_BOUNDS[key][1].tolist()]

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
    a vector env's batched observation is returned as arrays. Missing keys and values outside the
    env's observation space (`flexvlm_env.envs.core.make_observation_space`) are a ValueError."""
    missing = [key for key in OBSERVATION_KEYS if key not in observation]
    if missing:
        raise ValueError(f"observation is missing {missing}; a FlexVLM observation has keys {list(OBSERVATION_KEYS)}")
    if np.ndim(observation["family"]) == 0 and _valid_single(observation):
        return {
            "family": np.asarray(observation["family"], dtype=np.int64).reshape(1),
            **{key: np.asarray(observation[key], dtype=np.float32).reshape(1, -1) for key in _BOX_KEYS},
        }
    family = _checked_family(observation["family"])
    single = family.ndim == 0
    batch = {"family": family.reshape(1) if single else family}
    for key in _BOX_KEYS:
        batch[key] = _box_rows(key, observation[key], 1 if single else len(family), single)
    _check_bounds(batch)
    return batch


def _valid_single(observation: Mapping[str, Any]) -> bool:
    """True if one observation (scalar family, flat feature arrays) is inside the observation space; False sends it
    to the general check, which names what is wrong (or accepts an unusual but valid layout, e.g. [1, n] arrays)."""
    # Python comparisons on a dozen numbers: a third of what the NumPy check costs at batch 1, where a
    # controller's whole decision takes tens of microseconds (M3).
    try:
        family = operator.index(observation["family"])  # refuses floats, which int64 would truncate to a family
    except TypeError:
        return False
    if not 0 <= family < FAMILY_COUNT:
        return False
    values = []
    for key, shape in _BOX_SHAPES:
        value = observation[key]
        if type(value) is not np.ndarray or value.shape != shape:
            return False
        values += value.tolist()
    # NaN fails both comparisons
    return all(map(operator.le, _LOW_LIST, values)) and all(map(operator.le, values, _HIGH_LIST))


def _checked_family(value: Any) -> np.ndarray:
    """int64 family indices (a scalar or [B]), or a ValueError naming those that index no family."""
    family = np.asarray(value)
    valid = _is_family_index(family)
    if not valid.all():
        bad = np.unique(family[~valid])
        raise ValueError(f"observation['family'] holds family index {bad[:5].tolist()} out of range; allowed: "
                         f"integers in [0, {FAMILY_COUNT}) (indices of FAMILY_NAMES)")
    return family.astype(np.int64, copy=False)


def _is_family_index(family: np.ndarray) -> np.ndarray:
    # Checked before the cast to int64, which would turn a NaN or 2.5 into some family.
    return (family >= 0) & (family < FAMILY_COUNT) & (family == np.floor(family))


def _box_rows(key: str, value: Any, rows: int, single: bool) -> np.ndarray:
    """float32 [rows, width] of a Box key, or a ValueError naming the key and its wrong shape."""
    width = _BOX_BOUNDS[key][0].size
    values = np.asarray(value, dtype=np.float32)
    if values.size != rows * width:
        expected = (width,) if single else (rows, width)
        raise ValueError(f"observation[{key!r}] has shape {values.shape}; allowed: {expected} "
                         f"({width} value{'s' if width > 1 else ''} per observation)")
    return values.reshape(rows, width)


def _check_bounds(batch: Mapping[str, np.ndarray]) -> None:
    """A ValueError naming the first Box key of `batch` with values outside the observation space."""
    for key in _BOX_KEYS:
        low, high = _BOX_BOUNDS[key]
        inside = (batch[key] >= low) & (batch[key] <= high)  # NaN compares False, so it is refused too
        if not inside.all():
            bad = batch[key][~inside]
            what = "non-finite values" if not np.isfinite(bad).all() else "values outside the observation space"
            raise ValueError(f"observation[{key!r}] holds {what} {bad[:5].tolist()}; allowed: finite values in "
                             f"[{_bound_text(low)}, {_bound_text(high)}] (the observation space's bounds)")


def _bound_text(bound: np.ndarray) -> str:
    return f"{bound[0]:g}" if bound.size == 1 else "(" + ", ".join(f"{b:g}" for b in bound) + ")"


def is_single_observation(observation: Mapping[str, Any]) -> bool:
    """True for one env observation with every key (a scalar family): what the controllers' batch-1 paths
    take; a batch, or an observation missing keys (the batch path names them), is not. A single
    observation outside the observation space is a ValueError (see `as_batch`), since those paths
    read it without `as_batch`."""
    single = all(key in observation for key in OBSERVATION_KEYS) and np.ndim(observation["family"]) == 0
    if single and not _valid_single(observation):
        as_batch(observation)  # names what is wrong
    return single


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
        """Write the controller to directory `path`: a new or empty one, or one holding a saved
        controller, which is replaced atomically (a crash leaves the old one). A directory holding
        anything else is refused (FileExistsError), never deleted. The files get the modes the
        user's umask gives new files: a saved controller is an artifact to share."""
        # The training package imports the model (~0.4 s), which only saving needs, for its file helpers.
        from flexvlm_env.training.state import replace_directory, share_with_umask

        path = Path(path)
        _check_replaceable(path)
        config, tensors = self.state()
        record = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "grid": grid_to_json(self.grid),
            "config": config,
            "metadata": dict(metadata or {}),
        }
        payload = json.dumps(record, indent=1)  # a config that is not JSON fails before the disk is touched
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        try:
            (staging / CONTROLLER_FILE).write_text(payload)
            if tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_FILE))
            share_with_umask(staging)
            replace_directory(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Controller:
        """The controller saved at `path`. Called on a subclass (`LUTController.load`), a saved
        controller of another kind is a TypeError; `Controller.load` loads any kind."""
        return _load(Path(path), cls)


def _check_replaceable(path: Path) -> None:
    """FileExistsError unless `path` is new, an empty directory or one holding only a saved controller."""
    from flexvlm_env.training.state import foreign_entries

    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"path={str(path)!r} exists and is not a directory; choose an empty or new directory")
    foreign = foreign_entries(path, {CONTROLLER_FILE, WEIGHTS_FILE})
    if foreign:
        raise FileExistsError(f"path={str(path)!r} holds entries that are not a saved controller's ({foreign[:5]}"
                              f"{' and more' if len(foreign) > 5 else ''}); refusing to replace it: "
                              "choose an empty or new directory")


def load_controller(path: str | Path) -> Controller:
    """A controller saved with `Controller.save` (any kind)."""
    return _load(Path(path), Controller)


def _load(path: Path, expected: type[Controller]) -> Controller:
    """The controller saved at `path`, which must be an `expected` (TypeError otherwise); files that
    are corrupt or do not make a controller of their kind are a ValueError naming them."""
    record = _read_record(path / CONTROLLER_FILE)
    kind = record["kind"]
    module, name = CONTROLLER_CLASSES[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    if not issubclass(cls, expected):
        raise TypeError(f"{path} holds a saved {kind!r} controller ({cls.__name__}), not a {expected.__name__}; "
                        f"load it with {cls.__name__}.load or load_controller")
    tensors = _read_weights(path / WEIGHTS_FILE)
    try:
        return cls.from_state(record["config"], tensors, grid_from_json(record["grid"]))
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise ValueError(f"{path}: {CONTROLLER_FILE} and {WEIGHTS_FILE} do not make a {kind!r} controller "
                         f"({type(error).__name__}: {error}); they are corrupt or were written by other code") from error


def _read_record(record_path: Path) -> dict:
    """The JSON record of a saved controller, checked to name a known kind in this format."""
    if not record_path.exists():
        raise FileNotFoundError(f"no saved controller in {record_path.parent} (missing {CONTROLLER_FILE})")
    try:
        record = json.loads(record_path.read_text())
    except ValueError as error:  # invalid JSON or not UTF-8
        raise ValueError(f"{record_path} is not valid JSON ({error}); the file is corrupt") from error
    if not isinstance(record, dict):
        raise ValueError(f"{record_path} holds a JSON {type(record).__name__}; a saved controller's record is an "
                         f"object with keys {list(RECORD_KEYS)}")
    kind = record.get("kind")
    if kind not in CONTROLLER_CLASSES:
        raise ValueError(f"{record_path}: kind={kind!r} is not known; allowed: {sorted(CONTROLLER_CLASSES)}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{record_path}: format_version={record.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"{record_path} lacks {missing}; a saved controller's record has keys {list(RECORD_KEYS)}")
    return record


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    """The saved tensors ({} for a controller saved without any)."""
    if not weights_path.exists():
        return {}
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({error}); the file is corrupt") from error


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
