"""Reading and writing weights: official MolmoE checkpoints (strict) and FlexVLM's own files.

An official checkpoint directory holds `config.json`, `model.safetensors` or sharded
`model-*.safetensors` with `model.safetensors.index.json`, and the tokenizer. Loading is strict:
every parameter the architecture needs must be present and nothing else may be, so a renamed or
truncated checkpoint fails loudly instead of leaving random weights in place. Tensors are copied
one at a time into the model (experts into their slot of the stacked tensors), so peak memory
stays near one copy of the model. Only safetensors are read; there is no pickle path.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .args import ModelArgs
from .molmoe import MolmoE

_EXPERT = re.compile(r"^model\.transformer\.blocks\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
HUB_ID = "allenai/MolmoE-1B-0924"


def official_names(args: ModelArgs) -> set[str]:
    """Every tensor name an official MolmoE checkpoint with these sizes holds."""
    names = set()
    for name in _native_names(args):
        match = re.match(r"^model\.transformer\.blocks\.(\d+)\.mlp\.(w_gate_up|w_down)$", name)
        if match is None:
            names.add(name)
            continue
        block, which = match.groups()
        projections = ("gate_proj", "up_proj") if which == "w_gate_up" else ("down_proj",)
        for expert in range(args.n_experts):
            for projection in projections:
                names.add(f"model.transformer.blocks.{block}.mlp.experts.{expert}.{projection}.weight")
    return names


def _native_names(args: ModelArgs) -> list[str]:
    with torch.device("meta"):
        return [name for name, _ in MolmoE(args).named_parameters()]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (a file, or a directory's single or sharded files)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"weights file {path} is not a .safetensors file; only safetensors are loaded (no pickle)")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint index {index} lists shards that are missing: {missing[:5]}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
    hint = " (found pickle files, which FlexVLM does not load; convert them to safetensors)" if bins else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def checkpoint_names(path: Path) -> set[str]:
    names = set()
    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
        except Exception as error:  # safetensors' SafetensorError (a corrupt or truncated file) names no path
            raise ValueError(f"weights file {file} is not a readable safetensors file: {error}") from None
    return names


def check_checkpoint_names(model: MolmoE, path: Path) -> str:
    """Raise unless the checkpoint at `path` holds exactly the tensors `model` needs (names only: `model` may
    still be on the meta device); return its format, 'flexvlm' (stacked experts) or 'official'."""
    found = checkpoint_names(path)
    native = {name for name, _ in model.named_parameters()}
    fmt = "flexvlm" if found & {n for n in native if n.endswith(("w_gate_up", "w_down"))} else "official"
    _strict_check(found, native if fmt == "flexvlm" else official_names(model.args), path)
    return fmt


def _strict_check(found: set[str], expected: set[str], source: Path) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source} does not match the architecture: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]}); refusing to load "
            "partially (missing weights would silently stay random)"
        )


@torch.no_grad()
def load_weights_(model: MolmoE, path: Path) -> str:
    """Copy a checkpoint into `model` strictly; return its format ('official' or 'flexvlm')."""
    files = checkpoint_files(path)
    fmt = check_checkpoint_names(model, path)
    params = dict(model.named_parameters())
    hidden = model.args.expert_hidden
    for name, tensor in _iter_tensors(files):
        match = _EXPERT.match(name)
        if match is None:
            target = params[name]
        else:
            block, expert, projection = match.groups()
            mlp = f"model.transformer.blocks.{block}.mlp"
            if projection == "down_proj":
                target = params[f"{mlp}.w_down"][int(expert)]
            else:
                offset = 0 if projection == "gate_proj" else hidden
                target = params[f"{mlp}.w_gate_up"][int(expert), offset : offset + hidden]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        target.copy_(tensor)
    return fmt


def save_flexvlm(model: MolmoE, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Save in FlexVLM's own layout (stacked experts) with the model args in the metadata; return sha256."""
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
    meta = {"format": "flexvlm", "args": json.dumps(model.args.to_dict())}
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return file_sha256(path)


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors' SafetensorError (a corrupt or truncated file) names no path
        raise ValueError(f"weights file {path} is not a readable safetensors file: {error}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(weights: str | Path) -> Path:
    """A local directory/file, or a hub id downloaded (config, safetensors, tokenizer only)."""
    if not isinstance(weights, (str, Path)):
        raise ValueError(f"weights={weights!r} must be a path, a hub id like {HUB_ID!r}, 'random' or None")
    path = Path(weights).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(weights):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                repo_id=weights,
                allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"],
            )
        except Exception as error:  # offline, unknown repository, gated model: huggingface_hub's own errors
            raise FileNotFoundError(f"weights={weights!r} is not an existing path, and downloading it as a hub id "
                                    f"failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                                    "pass a checkpoint directory or .safetensors file") from error
        return Path(local)
    raise FileNotFoundError(f"weights={str(weights)!r} is neither an existing path nor a hub id like {HUB_ID!r}")


_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".gz")


def looks_like_hub_id(weights) -> bool:
    """Whether `weights` (not an existing path) is read as a hub repository id, "owner/name". A name with a file
    suffix is a mistyped path, not a repository ("runs/model.safetensors")."""
    return (isinstance(weights, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", weights) is not None
            and Path(weights).suffix not in _FILE_SUFFIXES)
