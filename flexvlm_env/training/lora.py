"""LoRA adapters for a FlexVLM `MolmoE`, through `peft`: add them for training, save them as
safetensors, and apply a saved one to a base model, merged or not.

Only `nn.Linear` layers take an adapter; by default each decoder block's attention projections
(`att_proj`, `attn_out`) and router (`gate`). The stacked experts (`mlp.w_gate_up`, `mlp.w_down`)
are plain parameters read by the MoE kernels, so they take none. Applying an adapter merged (the
default) folds its deltas into the base weights and leaves a plain `MolmoE`: CUDA graphs, the fused
decode kernels and the byte counts of the latency model all run as without it. Unmerged, the LoRA
layers sit in the module tree and every path calls them, since the runtime calls each targeted
layer as a module and reads none of their weights directly. Files are safetensors and JSON only.
`peft` is imported inside the functions: it pulls in `transformers` (about 2 s), which the runtime
needs only when an adapter is used.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..model.molmoe import MolmoE
from .state import foreign_entries, replace_directory, share_with_umask

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names, so peft's own loaders read our adapters
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_METADATA = "flexvlm_adapter.json"
BASE_SHA256_KEY = "base_weights_sha256"  # metadata key `load_model` checks against the loaded weights
_ADAPTER_FILES = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_METADATA}


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how; the saved `adapter_config.json` records the same values."""

    rank: int = 8
    """Inner dimension r of each adapter: it adds r * (in + out) parameters per targeted layer."""
    alpha: float = 16.0
    """The update B @ A is scaled by alpha / rank, so the step size keeps its meaning when the rank changes."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 keeps the adapter branch deterministic)."""
    target_modules: tuple[str, ...] = ("att_proj", "attn_out", "gate")
    """Module-name suffixes of the nn.Linear layers to adapt, matched as peft matches them (the whole
    name or its end after a dot): "gate" is every block's router, "attn.att_proj" works too."""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} is not valid; allowed: an int >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is not valid; allowed: a finite number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} is not valid; allowed: 0 <= dropout < 1")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules={targets!r} is not valid; allowed: a non-empty tuple of module-name suffixes, "
                "e.g. ('att_proj', 'attn_out', 'gate')"
            )
        object.__setattr__(self, "target_modules", tuple(targets))  # a list would make the spec unhashable

    def peft_config(self) -> "LoraConfig":
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules), bias="none",
        )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _check_plain_molmoe(module) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, PeftModel) or not isinstance(module, MolmoE):
        raise TypeError(f"module must be a plain flexvlm_env MolmoE, got {type(module).__name__}")
    adapted = [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    if adapted:
        raise ValueError(
            f"module already carries adapter layers ({len(adapted)}, e.g. {adapted[0]}); apply one adapter at a "
            "time, merged (apply_adapter(..., merge=True)), before adding or applying another"
        )


def _check_targets(module: MolmoE, targets) -> None:
    """Each target must name at least one nn.Linear and nothing else: peft would skip a target that
    matches nothing as long as another one matches, and an adapter silently missing layers is the
    failure this prevents."""
    modules = dict(module.named_modules())
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, nn.Linear)})
    for target in targets:
        hits = [name for name in modules if _matches(name, target)]
        if not hits:
            raise ValueError(
                f"target_modules entry {target!r} matches no nn.Linear in {type(module).__name__}; "
                f"its linear layers end in: {suffixes}"
            )
        other = [name for name in hits if not isinstance(modules[name], nn.Linear)]
        if other:
            raise ValueError(
                f"target_modules entry {target!r} matches {other[0]} ({type(modules[other[0]]).__name__}), which is "
                f"not an nn.Linear (the stacked experts are plain parameters and take no adapter); "
                f"linear layers end in: {suffixes}"
            )


def add_lora(module: MolmoE, spec: LoraSpec) -> "PeftModel":
    """Wrap `module`'s targeted layers with fresh LoRA adapters (B = 0, so outputs are unchanged) and
    freeze every base parameter: only the `lora_` parameters require grad afterwards.

    The module is changed in place and stays reachable as `peft_model.base_model.model`, so the
    training forward (`teacher_forced_loss(peft_model.base_model.model, ...)`) needs no change. On a
    bf16/fp16 base the adapter weights are float32 (peft's default), for stable optimizer updates.
    """
    from peft import get_peft_model

    _check_plain_molmoe(module)
    _check_targets(module, spec.target_modules)
    return get_peft_model(module, spec.peft_config())


def adapter_parameter_count(module: nn.Module) -> int:
    """Number of LoRA parameters in a module or PeftModel (the adapter's size: x4 bytes saved)."""
    return sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)


def save_adapter(peft_model: "PeftModel", directory: str | Path, metadata: dict | None = None) -> Path:
    """Write the adapter to `directory`: `adapter_model.safetensors`, `adapter_config.json` (peft's
    format, readable by `PeftModel.from_pretrained` too) and, when given, `metadata` as
    `flexvlm_adapter.json` (e.g. {"base_weights_sha256": ..., "spec": ..., "steps": ...}; `load_model`
    refuses an adapter whose `base_weights_sha256` differs from the weights it loaded).

    Everything is written into a sibling temporary directory that is then renamed into place, so a
    crash mid-save never leaves a partial adapter under `directory`. An existing adapter directory
    is replaced; a directory holding other files is refused rather than deleted.
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be the PeftModel that add_lora returned, got {type(peft_model).__name__}")
    directory = Path(directory)
    # Serialise first: metadata that is not JSON fails before anything touches the disk.
    payload = json.dumps(metadata, indent=2, sort_keys=True) if metadata is not None else None
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"directory={str(directory)!r} exists and is not a directory")
        foreign = foreign_entries(directory, _ADAPTER_FILES)
        if foreign:
            raise ValueError(
                f"directory={str(directory)!r} holds files that are not an adapter's ({foreign[:5]}); "
                "refusing to replace it: choose an empty or new directory"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
        # peft also writes a README.md model card of Hub boilerplate; the metadata file says what this is.
        (staging / "README.md").unlink(missing_ok=True)
        if payload is not None:
            (staging / ADAPTER_METADATA).write_text(payload + "\n")
        share_with_umask(staging)
        written = {p.name for p in staging.iterdir()}
        if written != _ADAPTER_FILES - ({ADAPTER_METADATA} if payload is None else set()):
            raise RuntimeError(f"peft wrote {sorted(written)}, not the expected adapter files; nothing was saved")
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_adapter_metadata(directory: str | Path) -> dict:
    """The metadata `save_adapter` stored with an adapter ({} when none was given)."""
    path = Path(directory) / ADAPTER_METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_config(directory: Path) -> "LoraConfig":
    from peft import LoraConfig

    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pkl"))
        hint = f" (found {pickles}: pickle files are never loaded; save adapters as safetensors)" if pickles else ""
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter directory {directory}{hint}")
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in adapter directory {directory}")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"adapter {directory} is a {peft_type!r} adapter; only LoRA adapters are supported")
    return LoraConfig.from_pretrained(str(directory))


def apply_adapter(module: MolmoE, directory: str | Path, merge: bool = True) -> MolmoE:
    """Load the adapter saved in `directory` onto `module` (in place) and return the module.

    merge=True folds B @ A * alpha / rank into the base weights (peft's `merge_and_unload`) and
    returns a plain `MolmoE`, so every fast path runs unchanged at no extra cost. merge=False injects
    the LoRA layers, in the module's dtype, and leaves them unmerged: the same `MolmoE` object, whose
    forward computes W x + B A x (for comparing against the merged weights, or swapping adapters).
    The adapter must fit exactly: a missing, unexpected or differently shaped adapter tensor raises
    ValueError and leaves the module as it was. Parameters keep their `requires_grad` flags; the
    adapter's own (unmerged) are frozen.
    """
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    config = _read_config(directory)
    _check_plain_molmoe(module)
    if not isinstance(config.target_modules, str):  # a regex is peft's business
        _check_targets(module, sorted(config.target_modules))
    # The saved values replace the initial ones; peft's data-driven initialisations (PiSSA, EVA, ...)
    # would otherwise run on, and change, the base weights.
    config.init_lora_weights = False
    config.inference_mode = True
    requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
    device = next(module.parameters()).device
    # Merged: float32 adapter weights on a bf16 base, so the delta is rounded once, when it is added.
    peft_model = PeftModel(module, config, autocast_adapter_dtype=merge)
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(device))
        try:
            result = set_peft_model_state_dict(peft_model, state)
        except RuntimeError as error:
            mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
            if not mismatches:
                raise
            raise ValueError(
                f"adapter {directory} does not fit this {type(module).__name__} ({module.args.name}): "
                f"{len(mismatches)} tensors differ in shape, e.g. {mismatches[0]}"
            ) from None
        missing = [key for key in result.missing_keys if "lora_" in key]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(
                f"adapter {directory} does not fit this {type(module).__name__} ({module.args.name}): "
                f"{len(missing)} adapter tensors missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}); refusing to load it partially"
            )
    except BaseException:
        peft_model.unload()
        _restore_requires_grad(module, requires_grad)
        raise
    if merge:
        peft_model.merge_and_unload(safe_merge=True)
    _restore_requires_grad(module, requires_grad)
    return module


def _restore_requires_grad(module: MolmoE, requires_grad: dict[str, bool]) -> None:
    # peft freezes the base when it injects; lookups go by the base names, which the tuner layers
    # change (`att_proj.weight` -> `att_proj.base_layer.weight`).
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
            continue
        param.requires_grad_(requires_grad[name.replace(".base_layer.", ".")])
