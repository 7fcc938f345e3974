"""Resumable training state: weights, optimizer moments and progress, without pickle.

Tensors go to sharded safetensors files (each below `max_shard_size`, so a checkpoint can be
carried through size-limited transfers) and everything else to `state.json`. The directory is
written under a temporary name and renamed into place, so a crash mid-save leaves the previous
checkpoint intact; `load_training_state` restores the model and optimizer exactly, and the step
it returns is where the (deterministic) data stream resumes. The same directory handling (modes
from the umask, the swap into place, the check for files a replacing save would delete) serves the
other saved artifacts: LoRA adapters (`lora.save_adapter`) and controllers (`agents.base`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

STATE_FILE = "state.json"


def foreign_entries(directory: Path, allowed: Collection[str]) -> list[str]:
    """Sorted names in the existing directory `directory` that are not in `allowed`: what replacing it
    with a new save would delete, so a save refuses a directory that has any."""
    return sorted(entry.name for entry in directory.iterdir() if entry.name not in allowed)


def share_with_umask(directory: Path) -> None:
    """Give `directory` and the files in it the modes the user's umask gives new ones."""
    # mkdtemp makes a directory private and safetensors its files (0600), yet a checkpoint, adapter
    # or controller is an artifact to share. The umask can only be read by setting it: set it back.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for entry in directory.iterdir():
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


def replace_directory(staging: Path, directory: Path) -> None:
    """Rename the complete `staging` to `directory`, replacing an old one. The old one is renamed
    aside before and deleted after, so a crash in between leaves it under `.{name}.replaced`, where
    `recover_directory` finds it."""
    recover_directory(directory)
    if not directory.exists():
        os.replace(staging, directory)
        return
    retired = _retired(directory)
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(directory, retired)
    os.replace(staging, directory)
    shutil.rmtree(retired)


def recover_directory(directory: str | Path) -> bool:
    """Put back a save that a crash left renamed aside (between `replace_directory`'s two renames, `directory` is
    missing and its previous version is `.{name}.replaced`); True if it did. Readers call it first, so a resumed
    run finds its last checkpoint instead of starting over."""
    directory = Path(directory)
    retired = _retired(directory)
    if directory.exists() or not retired.is_dir():
        return False
    os.replace(retired, directory)
    return True


def _retired(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.replaced")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_training_state(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, progress: dict, max_shard_size: str = "15MB") -> Path:
    """Write model + optimizer + `progress` (JSON-serialisable: step, args, ...) to `directory`.

    `optimizer=None` writes a weights-only state (a third of the size, for moving a run between
    machines); resuming from it starts fresh AdamW moments (see `load_training_state`)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    optimizer_meta = None
    if optimizer is not None:
        optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
        tensors.update(optimizer_tensors)
    save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_size, safe_serialization=True)
    (tmp / STATE_FILE).write_text(json.dumps({"progress": progress, "optimizer": optimizer_meta}, indent=1))
    share_with_umask(tmp)
    replace_directory(tmp, directory)
    return directory


def load_training_state(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model (and optimizer, if given and saved) from `directory`; return the saved progress
    dict with "optimizer_restored" set: False for a weights-only state, whose optimizer starts
    with fresh moments (the caller re-warms the learning rate)."""
    directory = Path(directory)
    recover_directory(directory)
    meta_path = directory / STATE_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"no training state in {directory} (missing {STATE_FILE})")
    meta = json.loads(meta_path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard, device=str(next(model.parameters()).device)))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    restored = optimizer is not None and meta["optimizer"] is not None
    if restored:
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    return {**meta["progress"], "optimizer_restored": restored}
