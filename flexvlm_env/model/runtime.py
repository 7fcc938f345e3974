"""The public runtime: `load_model(...)` returns a `VLM` whose `generate` answers one request.

`VLM.generate(image, prompt, config, max_new_tokens)` applies the three knobs, runs the stages
(preprocess, vision encoder, projector, prefill, decode), stops at EOS or `max_new_tokens`, and
returns the text, the stage latency record and the token counts. `generate_batch` is the quality
path: several requests with one config, left-padded, giving the same answers as one at a time.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from ..config import Config
from .args import PRESETS, ModelArgs, args_from_molmo_config, preset_args
from .blocks import block_plan, validate_ranking
from .checkpoint import (checkpoint_files, check_checkpoint_names, file_sha256, load_weights_, read_metadata,
                         resolve_checkpoint)
from .decoder import KVCache
from .generate import CudaGraphs, decode_one_token, embed_inputs, prefill
from .molmoe import MolmoE
from .preprocess import ImageInputs, build_input_ids, preprocess_image
from .timing import LatencyRecord, StageTimer
from .tokenizer import TextTokenizer

DEFAULT_MAX_SEQ_LEN = 2048


def _is_count(value) -> bool:
    """An int >= 1 (NumPy integers too; not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TokenCounts:
    vision: int  # positions that receive an image feature
    prompt: int  # tokens of the templated prompt (" User: ... Assistant:")
    layout: int  # BOS and image layout tokens (<im_start>, <im_col>, <im_end>, unfilled cells)
    output: int  # generated tokens (EOS included when produced)

    @property
    def input(self) -> int:
        """Prefill length."""
        return self.vision + self.prompt + self.layout


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    latency: LatencyRecord | None
    tokens: TokenCounts
    config: Config
    plan: tuple[int, ...]
    tiling: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class PreparedRequest:
    input_ids: torch.Tensor  # int64 [L] on the CPU
    image: ImageInputs | None
    prompt_tokens: int
    crops: tuple[int, str]  # (crops, crop_rule) it was prepared for


class VLM:
    """A loaded model with its tokenizer, block ranking and device; see module docstring."""

    def __init__(
        self,
        module: MolmoE,
        tokenizer: TextTokenizer,
        *,
        block_ranking: Sequence[int] | None = None,
        ranking_source: str = "prefix order (no ranking measured)",
        random_weights: bool = False,
        weights_sha256: str | None = None,
        max_seq_len: int | None = None,
        use_cuda_graphs: bool = True,
        moe_impl: str = "auto",
        adapter: str | None = None,
        adapter_sha256: str | None = None,
        adapter_merged: bool | None = None,
    ):
        if moe_impl not in ("auto", "triton", "reference"):
            raise ValueError(f"moe_impl={moe_impl!r} is not valid; allowed: ('auto', 'triton', 'reference')")
        self.module = module.eval()
        self.module.transformer.moe_impl = moe_impl
        self.args: ModelArgs = module.args
        self.tokenizer = tokenizer
        self.special = tokenizer.special
        param = next(module.parameters())
        self.device, self.dtype = param.device, param.dtype
        n = self.args.n_layers
        self.block_ranking = validate_ranking(block_ranking if block_ranking is not None else range(n), n)
        self._plans: dict[tuple, tuple[int, ...]] = {}
        self._valid_configs: set[Config] = set()
        self.ranking_source = ranking_source
        self.random_weights = random_weights
        self.weights_sha256 = weights_sha256
        # Provenance of a LoRA adapter applied by `load_model` (None without one): results name the
        # weights they came from, and an adapter changes them.
        self.adapter, self.adapter_sha256, self.adapter_merged = adapter, adapter_sha256, adapter_merged
        # The static KV cache is read whole by every graphed decode step (static shapes), so it is
        # sized for the largest request FlexVLM makes (12 crops + long prompt + 256 output tokens
        # fits in 2048 for molmoe-1b), not the checkpoint's 4096-token limit.
        if max_seq_len is not None and not _is_count(max_seq_len):
            raise ValueError(f"max_seq_len={max_seq_len!r} must be an int >= 1 or None (the default, "
                             f"{min(self.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)} for this model)")
        self.max_seq_len = int(max_seq_len) if max_seq_len is not None else min(self.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        # The fused decode kernels belong to the fast path; moe_impl="reference" is the plain path.
        self.fused_decode = self.device.type == "cuda" and moe_impl != "reference"
        self._cache: KVCache | None = None
        self._graphs: CudaGraphs | None = None

    def __deepcopy__(self, memo) -> "VLM":
        # A loaded model is a handle on device memory, its KV cache and captured CUDA graphs (which
        # cannot be copied), not a value: Gymnasium deep-copies an env's kwargs (env.spec.make(),
        # the env checker), and those copies must share the model rather than fail or duplicate it.
        return self

    # ----------------------------------------------------------------------------------------
    # knobs

    def plan(self, config: Config) -> tuple[int, ...]:
        # Memoised: a controller switches configs every request, and re-deriving the plan (ranking
        # checks, the random policy's permutation) was most of applying one (experiment M3). The
        # ranking is part of the key, so assigning a new `block_ranking` can never reuse a stale plan.
        key = (config.mask_policy, config.active_blocks, config.mask_seed, self.block_ranking)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = block_plan(config.mask_policy, config.active_blocks, self.args.n_layers,
                                                 self.block_ranking, config.mask_seed)
        return plan

    def check_config(self, config: Config) -> Config:
        if not isinstance(config, Config):
            raise ValueError(f"config must be a flexvlm_env.Config, got {type(config).__name__}")
        # Memoised like `plan`: checking 16 per-block top_k values was most of what applying a
        # config costs the host (M3); a Config is frozen and this model's sizes are fixed.
        if config not in self._valid_configs:
            config.validate_for(n_experts=self.args.n_experts, n_blocks=self.args.n_layers, max_crops=self.args.max_crops)
            self._valid_configs.add(config)
        return config

    # ----------------------------------------------------------------------------------------
    # stages

    def prepare(self, image, prompt: str, config: Config) -> PreparedRequest:
        """Host-side preprocessing: tile the image, tokenize the prompt, lay out the sequence."""
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        image_inputs = None
        if image is not None:
            image_inputs = preprocess_image(
                image, config.crops, self.args.vision, self.special, crop_rule=config.crop_rule,
                device=self.device,
            )
        ids = build_input_ids(prompt_ids, self.special, image_inputs.tokens if image_inputs else None)
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"request needs {len(ids)} input tokens; this model's max_seq_len is {self.max_seq_len}")
        return PreparedRequest(torch.tensor(ids, dtype=torch.long), image_inputs, len(prompt_ids), (config.crops, config.crop_rule))

    def encode_image(self, image_inputs: ImageInputs) -> torch.Tensor:
        """Vision encoder stage: pooled features [crops, cells, W]."""
        images = image_inputs.images.to(self.device, self.dtype, non_blocking=True)
        masks = image_inputs.image_masks.to(self.device, non_blocking=True)
        return self.module.vision_backbone.encode(images, masks)

    def _kv_cache(self, length: int) -> KVCache:
        if self._cache is None or self._cache.max_seq < length:
            # One static cache per model, sized once: CUDA graphs capture its addresses.
            size = max(length, self.max_seq_len)
            self._cache = KVCache.allocate(self.args, 1, size, self.device, self.dtype)
            self._graphs = CudaGraphs(self.module, self._cache, fused_decode=self.fused_decode) if self.use_cuda_graphs else None
            self._slot_range = torch.arange(size, device=self.device)
        return self._cache

    # ----------------------------------------------------------------------------------------
    # batch-1 latency path

    @torch.inference_mode()
    def generate(
        self,
        image,
        prompt: str,
        config: Config | None = None,
        max_new_tokens: int = 16,
        *,
        ignore_eos: bool = False,
        timing: bool = True,
    ) -> GenerationResult:
        """Answer one request at `config` (default: full configuration). See module docstring.

        `ignore_eos` forces exactly `max_new_tokens` tokens (latency benchmarks). With
        `timing=False` only the end-to-end time is recorded.
        """
        config = self.check_config(config or Config(crops=self.args.max_crops, top_k=self.args.top_k, active_blocks=self.args.n_layers))
        if not _is_count(max_new_tokens):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        max_new_tokens = int(max_new_tokens)
        timer = StageTimer(self.device, enabled=timing)
        request = self.prepare(image, prompt, config)
        length = request.input_ids.shape[0]
        if length + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} with {length} input tokens exceeds max_seq_len={self.max_seq_len}"
            )
        plan, top_k = self.plan(config), config.top_k_per_block(self.args.n_layers)
        cache = self._kv_cache(length + max_new_tokens)
        input_ids = request.input_ids.to(self.device, non_blocking=True)[None]
        timer.mark("preprocess")

        features = image_idx = None
        if request.image is not None and self._graphs is not None:
            pooled = self._graphs.vision(request.image.images, request.image.image_masks)
            timer.mark("vision_encoder")
            features = self._graphs.projector(pooled)
            timer.mark("projector")
        elif request.image is not None:
            pooled = self.encode_image(request.image)
            timer.mark("vision_encoder")
            features = self.module.vision_backbone.project(pooled)
            timer.mark("projector")
        else:
            timer.mark("vision_encoder")
            timer.mark("projector")
        if request.image is not None:
            image_idx = request.image.image_input_idx
        embeds = embed_inputs(self.module, input_ids, features, image_idx)
        if self._graphs is not None:
            token = self._graphs.prefill(embeds, plan, top_k)
        else:
            token = prefill(self.module, embeds, plan, top_k, cache).argmax(dim=-1, keepdim=True)
        timer.mark("prefill")

        generated = [token]
        eos = self.special.eos
        # Without ignore_eos the host reads each token to stop at EOS (one sync per token, as any
        # streaming server does); with it the whole decode is queued and read once at the end.
        stop = not ignore_eos and int(token) == eos
        for step in range(1, max_new_tokens):
            if stop:
                break
            slot = length + step - 1
            if self._graphs is not None:
                token = self._graphs.decode(token, slot, plan, top_k)
            elif self.device.type == "cuda":
                # The masked full-buffer attention the graphs use, so eager and graphed agree bit for bit.
                slot_t = torch.tensor([slot], device=self.device)
                token = decode_one_token(
                    self.module, token, slot_t, plan, top_k, cache, slot_range=self._slot_range, fused=self.fused_decode
                )
            else:
                slot_t = torch.tensor([slot], device=self.device)
                token = decode_one_token(self.module, token, slot_t, plan, top_k, cache, cache_len=slot + 1)
            timer.mark("decode")
            generated.append(token)
            stop = not ignore_eos and int(token) == eos
        latency = timer.finish()
        ids = torch.cat(generated, dim=1)[0].tolist()
        text_ids = ids[:-1] if ids and ids[-1] == eos and not ignore_eos else ids
        return self._result(request, ids, text_ids, latency, config, plan)

    def _result(self, request: PreparedRequest, ids, text_ids, latency, config: Config, plan) -> GenerationResult:
        vision = request.image.vision_tokens if request.image is not None else 0
        length = request.input_ids.shape[0]
        return GenerationResult(
            text=self.tokenizer.decode(text_ids),
            token_ids=ids,
            latency=latency,
            tokens=TokenCounts(vision=vision, prompt=request.prompt_tokens, layout=length - vision - request.prompt_tokens, output=len(ids)),
            config=config,
            plan=plan,
            tiling=request.image.tiling if request.image is not None else None,
        )

    def warmup(self, configs: Sequence[Config], image=None, prompt: str = "Describe this image.") -> dict:
        """Run one short request per config so that kernels are compiled and, on CUDA, the graphs
        this image and prompt need are captured before timing starts. Returns capture times (ms)."""
        from PIL import Image

        image = image if image is not None else Image.new("RGB", (self.args.vision.crop_px * 2, self.args.vision.crop_px * 2), (120, 90, 60))
        for config in configs:
            self.generate(image, prompt, config, max_new_tokens=3, ignore_eos=True, timing=False)
        return dict(self._graphs.capture_ms) if self._graphs else {}

    # ----------------------------------------------------------------------------------------
    # batched quality path

    @torch.inference_mode()
    def generate_batch(
        self,
        images: Sequence,
        prompts: Sequence[str],
        config: Config | None = None,
        max_new_tokens: int | Sequence[int] = 16,
    ) -> list[GenerationResult]:
        """Greedy answers for several requests at one config (no latency record).

        Sequences are left-padded; padded slots are masked out of attention and routed tokens never
        interact in the MoE, so each answer equals its batch-1 answer.
        """
        if len(images) != len(prompts):
            raise ValueError(f"images ({len(images)}) and prompts ({len(prompts)}) must have the same length")
        if not prompts:
            return []
        config = self.check_config(config or Config(crops=self.args.max_crops, top_k=self.args.top_k, active_blocks=self.args.n_layers))
        single = isinstance(max_new_tokens, numbers.Integral)
        budgets = [max_new_tokens] * len(prompts) if single else list(max_new_tokens)
        if len(budgets) != len(prompts) or not all(_is_count(b) for b in budgets):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1 or one such int per request")
        budgets = [int(b) for b in budgets]
        requests = [self.prepare(image, prompt, config) for image, prompt in zip(images, prompts)]
        return self.generate_prepared(requests, config, budgets)

    @torch.inference_mode()
    def generate_prepared(
        self, requests: Sequence[PreparedRequest], config: Config, max_new_tokens: Sequence[int],
        plan: Sequence[int] | None = None,
    ) -> list[GenerationResult]:
        """`generate_batch` on requests already through `prepare`. Preparation depends only on the
        crops knob (and crop rule), so a sweep over top_k and depth prepares each request once.
        `plan` (sorted block indices, block 0 included) overrides the config's block plan: block
        ablations such as measuring the importance ranking."""
        config = self.check_config(config)
        budgets = list(max_new_tokens)
        if len(budgets) != len(requests):
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(requests)} requests")
        wrong = {r.crops for r in requests} - {(config.crops, config.crop_rule)}
        if wrong:
            raise ValueError(f"requests were prepared for (crops, crop_rule) {sorted(wrong)}, not for "
                             f"{(config.crops, config.crop_rule)}: prepare them with this config")
        if plan is None:
            plan = self.plan(config)
        else:
            plan = tuple(int(b) for b in plan)
            if list(plan) != sorted(set(plan)) or not plan or plan[0] != 0 or plan[-1] >= self.args.n_layers:
                raise ValueError(f"plan={plan} must be sorted distinct block indices starting with 0, below {self.args.n_layers}")
        top_k = config.top_k_per_block(self.args.n_layers)
        batch = len(requests)
        lengths = [r.input_ids.shape[0] for r in requests]
        width = max(lengths)
        steps = max(budgets)
        device, d_model = self.device, self.args.d_model

        with_image = [i for i, r in enumerate(requests) if r.image is not None]
        features = {}
        if with_image:
            crops = [requests[i].image.n_crops for i in with_image]
            images_all = torch.cat([requests[i].image.images for i in with_image]).to(device, self.dtype)
            masks_all = torch.cat([requests[i].image.image_masks for i in with_image]).to(device)
            projected = self.module.vision_backbone.project(self.module.vision_backbone.encode(images_all, masks_all))
            for i, chunk in zip(with_image, projected.split(crops)):
                features[i] = chunk

        embeds = torch.zeros(batch, width, d_model, device=device, dtype=self.dtype)
        pads = [width - n for n in lengths]
        for i, request in enumerate(requests):
            ids = request.input_ids.to(device)[None]
            idx = request.image.image_input_idx if i in features else None
            embeds[i, pads[i]:] = embed_inputs(self.module, ids, features.get(i), idx)[0]
        cache = KVCache.allocate(self.args, batch, width + steps, device, self.dtype)
        slots = torch.arange(width + steps, device=device)
        pad_t = torch.tensor(pads, device=device)
        key_valid = slots[None, :] >= pad_t[:, None]  # [B, S]
        positions = (torch.arange(width, device=device)[None, :] - pad_t[:, None]).clamp(min=0)
        causal = slots[None, :width] <= slots[:width, None]  # [T, T]
        # Padded queries attend to themselves only, so no softmax row is empty.
        mask = (causal[None] & key_valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)[None]
        hidden = self.module.transformer(embeds, positions, plan, top_k, cache=cache, cache_index=slots[:width], mask=mask[:, None])
        token = self.module.lm_head(hidden[:, -1]).argmax(dim=-1, keepdim=True)  # [B, 1]

        eos = self.special.eos
        outputs = [token]
        finished = (token[:, 0] == eos) | (torch.tensor(budgets, device=device) <= 1)
        for step in range(1, steps):
            if bool(finished.all()):
                break
            slot = width + step - 1
            slot_t = torch.tensor([slot], device=device)
            step_positions = (slot - pad_t)[:, None]
            step_mask = (key_valid & (slots[None, :] <= slot))[:, None, None, :]
            hidden = self.module.transformer(
                self.module.transformer.wte(token), step_positions, plan, top_k, cache=cache,
                cache_index=slot_t, mask=step_mask, attend_cache=True,
            )
            token = self.module.lm_head(hidden[:, -1]).argmax(dim=-1, keepdim=True)
            outputs.append(token)
            finished |= (token[:, 0] == eos) | (torch.tensor(budgets, device=device) <= step + 1)

        all_ids = torch.cat(outputs, dim=1).tolist()
        results = []
        for i, request in enumerate(requests):
            ids = all_ids[i][: budgets[i]]
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            text_ids = ids[:-1] if ids and ids[-1] == eos else ids
            results.append(self._result(request, ids, text_ids, None, config, plan))
        return results


# --------------------------------------------------------------------------------------------
# loading


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type not in ("cpu", "cuda"):  # the runtime's kernels and timers know these two
        raise ValueError(f"device={str(device)!r} is not supported; allowed: 'cpu', 'cuda' (or 'cuda:N')")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available on this machine")
    return device


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")


def assets_dir(preset: str) -> Path:
    """Files shipped for a preset: micro's weights and tokenizer, molmoe-1b's tokenizer (so that
    random-weight latency studies see the real token counts)."""
    return Path(str(resources.files("flexvlm_env") / "assets" / preset))



def load_model(
    preset: str,
    weights: str | Path | None = None,
    device=None,
    dtype=None,
    *,
    tokenizer: str | Path | None = None,
    seed: int = 0,
    max_seq_len: int | None = None,
    use_cuda_graphs: bool = True,
    moe_impl: str = "auto",
    adapter: str | Path | None = None,
    merge_adapter: bool = True,
) -> VLM:
    """Build a model.

    Args:
        preset: "micro" or "molmoe-1b".
        weights: a checkpoint directory or .safetensors file, a hub id (molmoe-1b:
            "allenai/MolmoE-1B-0924"), "random" for seeded random weights (latency studies and
            tests only), or None for the preset's default (micro: the shipped weights; molmoe-1b
            has no default and asks for a checkpoint). The checkpoint's own sizes (FlexVLM metadata or
            config.json) set the architecture; a FlexVLM file of the other preset is refused. A directory
            holding one model.safetensors is that file (its metadata, block ranking and sha256).
        device: "cpu", "cuda", ... (default: CUDA when available).
        dtype: "float32", "bfloat16" or "float16" (default: bf16 on CUDA, float32 on CPU).
        tokenizer: tokenizer.json(.gz) path (default: from the checkpoint directory; micro: shipped).
        use_cuda_graphs, moe_impl: the fast path (CUDA-graph decode, Triton MoE kernels) is the
            default on CUDA; `use_cuda_graphs=False, moe_impl="reference"` is the plain path.
        adapter: a LoRA adapter directory written by `flexvlm_env.training.save_adapter`, applied
            after the base weights load (random weights too: tests). It must fit the model exactly,
            and an adapter whose metadata names other base weights (`base_weights_sha256`) is refused.
        merge_adapter: fold the adapter into the base weights (default), so that every fast path
            runs unchanged and at the base model's cost; False keeps the LoRA layers unmerged (the
            same outputs up to rounding, slower: for checking the merge or swapping adapters).
    """
    args = preset_args(preset)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r} must be an int (it seeds weights='random')")
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    ranking, ranking_source, sha = None, "prefix order (random weights)", None
    random_weights = isinstance(weights, str) and weights == "random"
    checkpoint: Path | None = None
    if weights is None:
        if preset != "micro":
            raise ValueError(
                f"preset {preset!r} has no bundled weights: pass weights=<checkpoint dir or hub id, e.g. "
                "'allenai/MolmoE-1B-0924'>, or weights='random' for latency studies"
            )
        checkpoint = assets_dir("micro") / "model.safetensors"
        if not checkpoint.exists():
            raise FileNotFoundError(
                f"the micro weights are not in this install ({checkpoint}); train them with "
                "scripts/train_micro.py, or pass weights='random' for latency studies"
            )
    elif not random_weights:
        checkpoint = resolve_checkpoint(weights)

    meta: dict = {}
    single: Path | None = None  # the checkpoint's one weights file, if it has one (a file or a directory's)
    if checkpoint is not None:
        files = checkpoint_files(checkpoint)  # fail on missing/pickle-only weights before anything else
        config_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
        if len(files) == 1:
            single = files[0]
            meta = read_metadata(single)
        if meta.get("format") == "flexvlm":
            args = ModelArgs.from_dict(json.loads(meta["args"]))
            if args.name in PRESETS and args.name != preset:  # its tokenizer and assets are another preset's
                raise ValueError(f"weights={str(weights)!r} holds a {args.name!r} model (its metadata); pass "
                                 f"preset={args.name!r}, not {preset!r}")
        elif (config_dir / "config.json").exists():
            args = args_from_molmo_config(json.loads((config_dir / "config.json").read_text()), name=preset)
        if meta.get("block_ranking"):
            ranking = json.loads(meta["block_ranking"])
            ranking_source = meta.get("block_ranking_source", "shipped with the weights")
        elif (config_dir / "block_ranking.json").exists():
            data = json.loads((config_dir / "block_ranking.json").read_text())
            ranking, ranking_source = data["ranking"], data.get("source", str(config_dir / "block_ranking.json"))
        else:
            ranking_source = "prefix order (no ranking measured for these weights)"
        tokenizer_path = tokenizer or (assets_dir("micro") if preset == "micro" and weights is None else config_dir)
        has_tokenizer = any((config_dir / name).exists() for name in ("tokenizer.json", "tokenizer.json.gz"))
        if tokenizer is None and preset in ("micro", "molmoe-1b") and not has_tokenizer:
            # micro weights are trained with the shipped micro tokenizer (scripts/train_micro.py), so
            # an exported checkpoint need not carry a copy. Some MolmoE exports ship only
            # vocab.json/merges.txt; the shipped file is the official MolmoE-1B tokenizer (sha256
            # 7bce2ea5... of tokenizer.json, as in the reference fixture).
            tokenizer_path = assets_dir(preset)
    else:
        tokenizer_path = tokenizer or assets_dir(preset)
    text_tokenizer = TextTokenizer.from_file(tokenizer_path)
    if text_tokenizer.vocab_size > args.embedding_size:  # ids past the embedding would fail mid-generation
        raise ValueError(f"the tokenizer {tokenizer_path} has {text_tokenizer.vocab_size} tokens, more than the model's "
                         f"{args.embedding_size} embedding rows: pass the checkpoint's own tokenizer (tokenizer=)")

    # Build on the meta device and allocate once: a default init of 7B parameters would be wasted
    # work, since every value is overwritten below (loading is strict).
    with torch.device("meta"):
        module = MolmoE(args).to(dtype)
    if checkpoint is not None:  # names only, before the allocation: a wrong checkpoint is an error, not an OOM
        check_checkpoint_names(module, checkpoint)
    module.to_empty(device=device)
    if random_weights:
        module.init_random_(seed)
    else:
        load_weights_(module, checkpoint)
        if single is not None:
            sha = file_sha256(single)
    adapter_sha = None
    if adapter is not None:
        # Imported here: the training package (and peft, which it imports lazily) is only needed with an adapter.
        from ..training.lora import ADAPTER_WEIGHTS, BASE_SHA256_KEY, apply_adapter, read_adapter_metadata

        adapter = Path(adapter).expanduser()
        if adapter.is_file():
            raise ValueError(f"adapter={str(adapter)!r} is a file; pass the adapter's directory (the one "
                             f"`flexvlm_env.training.save_adapter` wrote, holding {ADAPTER_WEIGHTS})")
        trained_on = read_adapter_metadata(adapter).get(BASE_SHA256_KEY) if adapter.is_dir() else None
        if trained_on and sha and trained_on != sha:
            raise ValueError(
                f"adapter {adapter} was trained on base weights with sha256 {trained_on[:12]}..., but the loaded "
                f"weights have {sha[:12]}...: load the weights it was trained on"
            )
        module = apply_adapter(module, adapter, merge=merge_adapter)
        adapter_sha = file_sha256(adapter / ADAPTER_WEIGHTS)
    return VLM(
        module,
        text_tokenizer,
        block_ranking=ranking,
        ranking_source=ranking_source,
        random_weights=random_weights,
        weights_sha256=sha,
        max_seq_len=max_seq_len,
        use_cuda_graphs=use_cuda_graphs,
        moe_impl=moe_impl,
        adapter=str(adapter) if adapter is not None else None,
        adapter_sha256=adapter_sha,
        adapter_merged=merge_adapter if adapter is not None else None,
    )
