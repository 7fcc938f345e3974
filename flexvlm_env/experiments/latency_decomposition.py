"""E1 — stage-aware latency decomposition: which stages dominate end-to-end latency, and why FLOPs
do not predict wall-clock time (../shared/EXPERIMENTS.md "E1").

Two steps, so that the GPU is held only while it measures:
- `measure(vlm, spec)` times one model on one device and returns a raw record (written by the
  driver as `e1_raw_<tag>.json`): every timed repeat of every input regime (crops x prompt length x
  forced output length) at each knob setting (top_k, active_blocks), a prefill-length sweep, a long
  decode whose per-token times give the decode scaling curve, and a PyTorch-profiler operator
  breakdown of the LLM on a few requests.
- `analyse(raw_records)` merges the raw records of several devices into the summary (headline
  numbers per device) and one data file the figures are drawn from (`plot_from_results`).

Operator categories inside the LLM (`CATEGORIES`). The model has no profiler labels of its own, so
`module_labels` opens a `torch.profiler.record_function` range around chosen modules through
forward hooks: each block's `attn` (Attention: qkv and output projections, q/k norms, RoPE, KV write,
SDPA) -> attention; `mlp` (MoE) -> moe_experts, except its `gate` projection and the softmax/top-k
ops that follow it -> moe_routing; the pre-norms `attn.attn_norm` and `mlp.ff_norm` -> other. Every
op (CPU) or device kernel (CUDA) is charged to the innermost range it was launched from; anything
outside the ranges (embedding, RoPE tables, ln_f, LM head, argmax) is `other`. The fused CUDA decode
path calls Triton kernels outside the module forwards; those are classified by kernel name
(`KERNEL_NAME_RULES`: decode attention and the fused q/k-norm+RoPE+KV write -> attention,
softmax_topk -> moe_routing, the MoE gate_up/down and grouped-GEMM kernels -> moe_experts, the
fused add+RMSNorm -> other). The expert category includes dispatch (sorting token-expert pairs)
and the weighted sum of the k expert outputs. Profiling runs the eager path (no CUDA graph) and
counts device kernel time only, so launch gaps, which graphs remove, are not in the breakdown.

FLOPs (`request_flops`) are analytical, 2 per multiply-add, per stage: ViT over crops + 1 views (class
token included), 2x2 attention pooling, projector, and for the LLM the active blocks' attention
projections, router, top_k experts and causal attention over the real (unpadded) context, plus the
LM head once per generated token.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import distribution_summary, figures_path, pyplot, read_json, run_header, save_figure, write_json

STAGES = ("preprocess", "vision_encoder", "projector", "prefill", "decode")
STAGE_COLORS = {"preprocess": "0.6", "vision_encoder": "C0", "projector": "C4", "prefill": "C1", "decode": "C2"}
CATEGORIES = ("attention", "moe_routing", "moe_experts", "other")
LABEL_PREFIX = "flexvlm_e1::"
# Ops of MoE.route that run inside the MoE range but belong to routing (its gate is labelled).
ROUTING_OPS = ("aten::softmax", "aten::_softmax", "aten::topk")
# Substring of a kernel name -> category, for kernels launched outside the labelled modules (the
# fused CUDA decode path) and for kernels the profiler could not link to the op that launched them.
KERNEL_NAME_RULES = (
    ("_decode_attention", "attention"),
    ("_qk_norm_rope_kv", "attention"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("softmax_topk", "moe_routing"),
    ("_decode_gate_up", "moe_experts"),
    ("_decode_down", "moe_experts"),
    ("_grouped_gemm", "moe_experts"),
    ("_add_rms_norm", "other"),
)
RAW_PREFIX = "e1_raw_"


# ------------------------------------------------------------------------------------------------
# the measurement plan


@dataclass(frozen=True)
class Spec:
    """What `measure` runs (defaults: EXPERIMENTS.md's E1 regimes)."""

    crops: tuple[int, ...] = (1, 4, 12)
    prompt_tokens: tuple[tuple[str, int], ...] = (("short", 15), ("medium", 40), ("long", 120))
    # one forced length inside each of the catalogue's ranges 8-16, 32-64, 128-256
    output_tokens: tuple[tuple[str, int], ...] = (("short", 12), ("medium", 48), ("long", 192))
    knobs: tuple[tuple[str, int, int], ...] = (("full", 8, 16), ("reduced", 2, 10))  # (name, top_k, active_blocks)
    warmup: int = 2
    repeats: int = 5
    sweep_crops: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 12)  # prefill-vs-input-tokens sweep (short outputs)
    sweep_prompts: tuple[str, ...] = ("short", "long")
    sweep_output_tokens: int = 4
    decode_crops: int = 4  # the long decode (decode-vs-output-tokens curve)
    decode_output_tokens: int = 256
    profile_requests: tuple[tuple[int, str], ...] = ((1, "short"), (12, "long"))  # (crops, prompt)
    profile_decode_steps: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("warmup", "repeats", "profile_decode_steps", "sweep_output_tokens", "decode_output_tokens", "decode_crops"):
            value = getattr(self, name)
            low = 0 if name == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        for name in ("crops", "sweep_crops"):
            values = getattr(self, name)
            if not values or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in values):
                raise ValueError(f"{name}={values!r} must be a non-empty tuple of ints >= 1")
        for name in ("prompt_tokens", "output_tokens"):
            pairs = getattr(self, name)
            if not pairs or any(not isinstance(n, int) or n < 1 for _, n in pairs):
                raise ValueError(f"{name}={pairs!r} must be non-empty (label, tokens >= 1) pairs")
        prompts = dict(self.prompt_tokens)
        unknown = [p for p in self.sweep_prompts + tuple(p for _, p in self.profile_requests) if p not in prompts]
        if unknown:
            raise ValueError(f"prompt labels {unknown} are not in prompt_tokens; allowed: {sorted(prompts)}")
        if not self.knobs or any(k < 1 or b < 1 for _, k, b in self.knobs):
            raise ValueError(f"knobs={self.knobs!r} must be non-empty (name, top_k >= 1, active_blocks >= 1) triples")


def quick_spec() -> Spec:
    """A seconds-long plan for smoke tests (micro on a CPU)."""
    return Spec(crops=(1,), prompt_tokens=(("short", 15),), output_tokens=(("short", 4),), knobs=(("full", 8, 16), ("reduced", 2, 10)),
                warmup=1, repeats=2, sweep_crops=(1, 2), sweep_prompts=("short",), sweep_output_tokens=2, decode_crops=1,
                decode_output_tokens=8, profile_requests=((1, "short"),), profile_decode_steps=2)


PROMPT_TEXT = (
    "Look at the picture carefully and answer the question about it. Count the objects of each "
    "colour and shape, say where they are relative to one another, describe the background, the "
    "lighting and any text you can read, and then give a short answer followed by a longer "
    "explanation of how you reached it, mentioning every detail that supports the answer and any "
    "detail that could make it uncertain, such as overlapping shapes, shadows or partly hidden items."
)
PROMPT_WORDS = tuple(PROMPT_TEXT.split())


def build_prompt(encode_prompt, target_tokens: int) -> str:
    """The prompt (a prefix of a fixed English text, repeated as needed) whose templated token count
    (`encode_prompt(text)`, as the runtime counts prompt tokens) is closest to `target_tokens`."""
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < 1:
        raise ValueError(f"target_tokens={target_tokens!r} must be an int >= 1")
    best, best_gap = PROMPT_WORDS[0], None
    for n in range(1, 4 * target_tokens + 2):
        text = " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n))
        length = len(encode_prompt(text))
        gap = abs(length - target_tokens)
        if best_gap is None or gap < best_gap:
            best, best_gap = text, gap
        if length >= target_tokens:
            break
    return best


def noise_image(seed: int = 0, size_px: tuple[int, int] = (384, 288)):
    """A seeded noise image (varied content, so MoE routing spreads tokens over experts as real
    images do; a flat image would send every vision token to the same experts)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size_px
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


# ------------------------------------------------------------------------------------------------
# FLOPs


def request_flops(args, crops: int, input_tokens: int, output_tokens: int, top_k: int, active_blocks: int) -> dict[str, float]:
    """Analytical FLOPs (2 per multiply-add) of one request, per stage and in total (see module doc).
    `args` is a `ModelArgs`; `output_tokens` counts the first token (made by prefill)."""
    for name, value, low in (("crops", crops, 1), ("input_tokens", input_tokens, 1), ("output_tokens", output_tokens, 1),
                             ("top_k", top_k, 1), ("active_blocks", active_blocks, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if top_k > args.n_experts or active_blocks > args.n_layers:
        raise ValueError(f"top_k={top_k} / active_blocks={active_blocks} exceed the model's {args.n_experts} experts / {args.n_layers} blocks")
    v = args.vision
    views = crops + 1  # the global view plus the crops
    tokens = v.patches_per_crop + 1  # class token
    inner = v.n_heads * v.head_dim
    per_token_layer = 2 * (3 * v.width * inner + inner * v.width + 2 * v.width * v.mlp_dim)
    attention_layer = 2 * 2 * tokens * tokens * inner  # QK^T and AV
    vit = views * (2 * v.patch_dim * v.width * v.patches_per_crop + v.layers_to_run * (tokens * per_token_layer + attention_layer))
    cells = views * v.pooled_per_side**2
    in_dim = v.width * len(v.vit_layers)
    window = v.pool**2
    pool = cells * 2 * (in_dim * inner + 2 * window * in_dim * inner + 2 * window * inner + inner * v.width)
    projector = cells * 2 * (2 * v.width * args.projector_hidden + args.projector_hidden * args.d_model)
    d = args.d_model
    per_token_block = 2 * (4 * d * d + d * args.n_experts + top_k * 3 * args.expert_hidden * d)
    lm_head = 2 * d * args.embedding_size
    length = int(input_tokens)
    prefill = active_blocks * (length * per_token_block + 2 * 2 * d * length * (length + 1) / 2) + lm_head
    steps = int(output_tokens) - 1
    contexts = steps * length + steps * (steps + 1) / 2  # sum of context lengths L+1 .. L+steps
    decode = steps * (active_blocks * per_token_block + lm_head) + active_blocks * 2 * 2 * d * contexts
    out = {"vision_encoder": float(vit + pool), "projector": float(projector), "prefill": float(prefill), "decode": float(decode)}
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------
# operator breakdown


@contextmanager
def module_labels(model):
    """Profiler ranges around the decoder's modules (categories: see module doc), via forward hooks;
    removed on exit. `model` is a MolmoE."""
    from torch.profiler import record_function

    handles, open_ranges = [], defaultdict(list)

    def add(module, category):
        name = LABEL_PREFIX + category

        def enter(mod, inputs):
            rf = record_function(name)
            rf.__enter__()
            open_ranges[id(mod)].append(rf)

        def leave(mod, inputs, output):
            open_ranges[id(mod)].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    for block in model.transformer.blocks:
        attn, mlp = block.attn, block.mlp
        for module, category in ((attn, "attention"), (attn.att_proj, "attention"), (attn.attn_out, "attention"),
                                 (attn.attn_norm, "other"), (mlp, "moe_experts"), (mlp.ff_norm, "other"), (mlp.gate, "moe_routing")):
            add(module, category)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def kernel_category(name: str) -> str | None:
    """Category of a device kernel from its name alone (`KERNEL_NAME_RULES`), None if unknown."""
    for pattern, category in KERNEL_NAME_RULES:
        if pattern in name:
            return category
    return None


def event_category(event) -> str:
    """Category of a profiler event: the innermost labelled range around it (walking `cpu_parent`),
    with MoE.route's softmax/top-k moved from experts to routing; `other` outside every range."""
    routing_op = False
    node = event
    while node is not None:
        name = node.name
        if name.startswith(LABEL_PREFIX):
            category = name[len(LABEL_PREFIX):]
            return "moe_routing" if routing_op and category == "moe_experts" else category
        routing_op = routing_op or name in ROUTING_OPS
        node = node.cpu_parent
    return "other"


def attribute_events(events, device_type: str) -> tuple[dict[str, float], list[dict]]:
    """(microseconds per category, top kernels/ops with their category) of one profiler session.

    CPU: each event's self CPU time goes to its category. CUDA: each kernel's device time goes to
    the category of the op that launched it (or its name rule, which wins for the fused Triton
    kernels); kernels the profiler left unlinked are classified by name (`other` if no rule)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict[tuple[str, str], float] = defaultdict(float)
    if device_type == "cuda":
        import torch

        device_total: dict[str, float] = defaultdict(float)
        for event in events:
            # our ranges also appear on the device timeline (gpu_user_annotation spans): not kernels
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(LABEL_PREFIX):
                device_total[event.name] += event.time_range.elapsed_us()
        linked: dict[str, float] = defaultdict(float)
        for event in events:
            if event.device_type != torch.autograd.DeviceType.CPU:
                continue
            for kernel in event.kernels:
                if kernel.name.startswith(LABEL_PREFIX):
                    continue
                category = kernel_category(kernel.name) or event_category(event)
                totals[category] += kernel.duration
                by_name[(kernel.name[:100], category)] += kernel.duration
                linked[kernel.name] += kernel.duration
        for name, total in device_total.items():
            rest = total - linked.get(name, 0.0)
            if rest > 1e-3:
                category = kernel_category(name) or "other"
                totals[category] += rest
                by_name[(name[:100], category)] += rest
    else:
        for event in events:
            self_us = event.self_cpu_time_total
            if self_us <= 0:
                continue
            category = event_category(event)
            totals[category] += self_us
            by_name[(event.name[:100], category)] += self_us
    top = sorted(({"name": n, "category": c, "us": us} for (n, c), us in by_name.items()), key=lambda r: -r["us"])[:25]
    return totals, top


def profile_llm_operators(vlm, image, prompt: str, config, decode_steps: int) -> dict:
    """Operator breakdown of the LLM for one request: prefill and `decode_steps` decode tokens, run
    eagerly (the same kernels as the fast path, minus the CUDA graphs) under the PyTorch profiler,
    one session per phase. Returns ms per category for each phase (decode: per token)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..model.generate import decode_one_token, embed_inputs, prefill

    cuda = vlm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    plan, top_k = vlm.plan(config), config.top_k_per_block(vlm.args.n_layers)
    vlm.generate(image, prompt, config, max_new_tokens=2, ignore_eos=True, timing=False)  # allocates the cache
    cache = vlm._cache
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        request = vlm.prepare(image, prompt, config)
        features = vlm.module.vision_backbone.project(vlm.encode_image(request.image))
        embeds = embed_inputs(vlm.module, request.input_ids.to(vlm.device)[None], features, request.image.image_input_idx)
        length = embeds.shape[1]
        slot_range = torch.arange(cache.max_seq, device=vlm.device) if cuda else None

        def run_prefill():
            return prefill(vlm.module, embeds, plan, top_k, cache).argmax(dim=-1, keepdim=True)

        def run_decode(token):
            for step in range(decode_steps):
                slot = length + step
                slot_t = torch.tensor([slot], device=vlm.device)
                if cuda:
                    token = decode_one_token(vlm.module, token, slot_t, plan, top_k, cache, slot_range=slot_range, fused=vlm.fused_decode)
                else:
                    token = decode_one_token(vlm.module, token, slot_t, plan, top_k, cache, cache_len=slot + 1)
            return token

        run_decode(run_prefill())  # untimed: Triton compiles and allocator warm-up stay out of the profile
        sync()
        phases = {}
        with module_labels(vlm.module):
            for phase in ("prefill", "decode"):
                first = run_prefill() if phase == "decode" else None
                sync()
                with profile(activities=activities) as prof:
                    if phase == "prefill":
                        run_prefill()
                    else:
                        run_decode(first)
                    sync()
                totals_us, top = attribute_events(prof.events(), vlm.device.type)
                per = decode_steps if phase == "decode" else 1
                phases[phase] = {"ms": {c: totals_us[c] / 1e3 / per for c in CATEGORIES}, "top": top,
                                 "per": "token" if phase == "decode" else "request"}
    return {"input_tokens": int(length), "decode_steps": decode_steps, "clock": "device kernel time" if cuda else "CPU self time",
            "phases": phases}


# ------------------------------------------------------------------------------------------------
# measurement


def _row(result, **extra) -> dict:
    lat = result.latency
    row = {f"{s}_ms": float(getattr(lat, f"{s}_ms")) for s in STAGES}
    row.update(total_ms=float(lat.total_ms), crops=result.config.crops, top_k=result.config.top_k,
               active_blocks=result.config.active_blocks, vision_tokens=result.tokens.vision, prompt_tokens=result.tokens.prompt,
               input_tokens=result.tokens.input, output_tokens=result.tokens.output, **extra)
    return row


def time_configs(vlm, image, prompt_text: str, configs: Sequence[tuple[Any, dict]], output_tokens: int, warmup: int, repeats: int, *,
                 per_token: bool = False) -> list[dict]:
    """The latency protocol for one request at several configs: `warmup` discarded runs of each
    (on CUDA they also capture the graphs), then `repeats` timed rounds with forced output length,
    the configs interleaved within a round so that slow drift or a burst of load from other
    processes hits every config alike. `configs` holds (Config, extra row fields); one row per run."""
    for config, _ in configs:
        for _ in range(warmup):
            vlm.generate(image, prompt_text, config, max_new_tokens=output_tokens, ignore_eos=True)
    rows = []
    for repeat in range(repeats):
        for config, extra in configs:
            result = vlm.generate(image, prompt_text, config, max_new_tokens=output_tokens, ignore_eos=True)
            row = _row(result, repeat=repeat, **extra)
            if per_token:
                row["decode_ms_per_token"] = [float(x) for x in result.latency.decode_ms_per_token]
            rows.append(row)
    return rows


def _load_average() -> float | None:
    """The host's 1-minute load average (other processes competing for a shared CPU), if known."""
    import os

    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def device_tag(info: dict) -> str:
    """Short device name for file names and legends: h100 / h200 / a100 ... or cpu."""
    if info.get("device_type") != "cuda":
        return "cpu"
    name = str(info.get("device_name", "gpu")).lower()
    for known in ("h100", "h200", "a100", "l40s", "l4", "a10g", "v100", "t4"):
        if known in name:
            return known
    return name.replace("nvidia", "").strip().split()[0] if name.strip() else "gpu"


def measure(vlm, spec: Spec, deadline_s: float | None = None, log=print) -> dict:
    """Run `spec` on `vlm` (see module doc); stops cleanly at `deadline_s` (time.time()), marking
    the sections it cut short in `truncated`."""
    from ..benchmarking import device_info
    from ..config import Config

    start = time.time()
    load_start = _load_average()
    image = noise_image(spec.seed)
    prompts = {label: build_prompt(vlm.tokenizer.encode_prompt, n) for label, n in spec.prompt_tokens}
    truncated: list[str] = []

    def late(share: float = 1.0) -> bool:
        # Sections get cumulative shares of the time limit, so that a slow device still reaches
        # the sweeps and the profiler instead of spending the whole limit on the regime grid.
        return deadline_s is not None and time.time() >= start + share * (deadline_s - start)

    def cfg(crops, top_k, blocks):
        return Config(crops=crops, top_k=top_k, active_blocks=blocks)

    def knob_configs(crops, **extra):
        return [(cfg(crops, top_k, blocks), {"knob": knob, **extra}) for knob, top_k, blocks in spec.knobs]

    regimes: list[dict] = []
    for crops in spec.crops:
        for prompt_label, _ in spec.prompt_tokens:
            for output_label, output_tokens in spec.output_tokens:
                if late(0.65):
                    truncated.append("regimes")
                    break
                regimes += time_configs(vlm, image, prompts[prompt_label], knob_configs(crops, prompt=prompt_label, output=output_label),
                                        output_tokens, spec.warmup, spec.repeats)
        log(f"regimes crops={crops}: {time.time() - start:.1f}s")
    prefill_sweep: list[dict] = []
    for crops in spec.sweep_crops:
        for prompt_label in spec.sweep_prompts:
            if late(0.75):
                truncated.append("prefill_sweep")
                break
            prefill_sweep += time_configs(vlm, image, prompts[prompt_label], knob_configs(crops, prompt=prompt_label),
                                          spec.sweep_output_tokens, spec.warmup, spec.repeats)
    log(f"prefill sweep: {time.time() - start:.1f}s")
    decode_sweep: list[dict] = []
    middle_prompt = spec.prompt_tokens[len(spec.prompt_tokens) // 2][0]
    if late(0.85):
        truncated.append("decode_sweep")
    else:
        decode_sweep = time_configs(vlm, image, prompts[middle_prompt], knob_configs(spec.decode_crops, prompt=middle_prompt),
                                    spec.decode_output_tokens, spec.warmup, spec.repeats, per_token=True)
    log(f"decode sweep: {time.time() - start:.1f}s")
    operators: list[dict] = []
    for knob, top_k, blocks in spec.knobs:
        for crops, prompt_label in spec.profile_requests:
            if late():
                truncated.append("operators")
                break
            try:
                profile = profile_llm_operators(vlm, image, prompts[prompt_label], cfg(crops, top_k, blocks), spec.profile_decode_steps)
            except Exception as error:  # noqa: BLE001  (a profiler failure must not lose the timings measured above)
                profile = {"error": f"{type(error).__name__}: {error}"}
            operators.append({"knob": knob, "crops": crops, "top_k": top_k, "active_blocks": blocks, "prompt": prompt_label, **profile})
    log(f"operators: {time.time() - start:.1f}s")
    info = device_info(vlm.device)
    return {
        "host_load_average_1min": {"start": load_start, "end": _load_average()},
        "kind": "e1_raw", "preset": vlm.args.name, "model_args": vlm.args.to_dict(), "dtype": str(vlm.dtype).replace("torch.", ""),
        "weights": "random" if vlm.random_weights else (vlm.weights_sha256 or "checkpoint"), "device": info, "device_tag": device_tag(info),
        "cuda_graphs": bool(vlm.use_cuda_graphs), "spec": asdict(spec), "prompts": prompts, "truncated": sorted(set(truncated)),
        "measure_s": round(time.time() - start, 2), "regimes": regimes, "prefill_sweep": prefill_sweep, "decode_sweep": decode_sweep,
        "operators": operators,
    }


# ------------------------------------------------------------------------------------------------
# analysis


def find_raw_files(inputs: Iterable[Path], prefix: str = RAW_PREFIX) -> list[Path]:
    """Raw device files among `inputs` (files, or folders searched for `<prefix>*.json` and their
    gzipped `<prefix>*.json.gz`, as results/ keeps them); for a run found more than once, the file
    from the input given last, and within one folder the uncompressed file (a fresh copy)."""
    found: dict[str, Path] = {}
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            # .json.gz first, so that a .json of the same run in the same folder replaces it
            paths = sorted(item.glob(f"{prefix}*.json.gz")) + sorted(item.glob(f"{prefix}*.json"))
        elif item.is_file():
            paths = [item]
        else:
            raise ValueError(f"input {str(item)!r} does not exist (pass raw files or folders holding {prefix}*.json)")
        for path in paths:
            found[path.name.removesuffix(".gz")] = path  # the input given last wins (fresh device files after results/)
    return [found[name] for name in sorted(found)]


def raw_inputs(args) -> tuple[Path, ...]:
    """Where a measure/analyse driver (E1, M2) looks for raw files: `--inputs` if given, else the
    `--results` folder, plus `--out-dir` in mode "all". Defaults that do not exist yet (a fresh
    results folder) are skipped; given inputs must exist (`collect_raw` says so)."""
    if args.inputs:
        return tuple(args.inputs)
    defaults = (args.results, args.out_dir) if args.mode == "all" else (args.results,)
    return tuple(p for p in defaults if Path(p).exists())


def collect_raw(inputs: Iterable[Path], results_dir: Path, prefix: str, kind: str) -> list[tuple[Path, dict]]:
    """Load the raw device files and copy any that live outside `results_dir` into it (so that the
    committed results hold every raw file an analysis used)."""
    records = []
    for path in find_raw_files(inputs, prefix):
        raw = read_json(path)
        if raw.get("kind") != kind:
            raise ValueError(f"{path} is not a {kind} file (kind={raw.get('kind')!r})")
        target = Path(results_dir) / path.name
        if path.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        records.append((target, raw))
    if not records:
        raise ValueError(f"no {prefix}*.json raw files found in {[str(p) for p in inputs]}")
    return records


def run_label(raw: dict) -> str:
    """'molmoe-1b / H100 (cuda, bfloat16)': which model on which device, for every figure."""
    tag = raw["device_tag"].upper() if raw["device_tag"] != "cpu" else "CPU"
    return f"{raw['preset']} / {tag} ({raw['device'].get('device_name', '?')}, {raw['dtype']})"


def linear_fit(x, y) -> dict:
    """Least-squares y = slope x + intercept with R^2 (None when fewer than two distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0:
        return {"slope": None, "intercept": None, "r2": None, "n": int(x.size)}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(1 - (residual**2).sum() / total) if total > 0 else None, "n": int(x.size)}


def correlations(x, y) -> dict:
    """Pearson r (linear and log-log) and Spearman rank correlation."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "pearson_log": None, "spearman": None, "n": int(x.size)}
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)
    return {"pearson": float(np.corrcoef(x, y)[0, 1]), "pearson_log": float(np.corrcoef(np.log(x), np.log(y))[0, 1]),
            "spearman": float(np.corrcoef(rank(x), rank(y))[0, 1]), "n": int(x.size)}


def group_medians(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One row per distinct `keys`: median stage times, token counts, total distribution summary."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for key, members in groups.items():
        total = distribution_summary([m["total_ms"] for m in members])
        entry = dict(zip(keys, key))
        entry.update({f"{s}_ms": float(np.median([m[f"{s}_ms"] for m in members])) for s in STAGES})
        for name in ("crops", "top_k", "active_blocks", "vision_tokens", "prompt_tokens", "input_tokens", "output_tokens"):
            entry[name] = int(members[0][name])
        # the minimum as well: on a shared CPU it is the least disturbed run
        entry.update(total_ms=total["median"], total_ms_min=float(min(m["total_ms"] for m in members)), total_ms_summary=total)
        out.append(entry)
    return out


def analyse_run(raw: dict) -> dict:
    """Per-device tables and headline numbers of one raw record."""
    from ..model.args import ModelArgs

    args = ModelArgs.from_dict(raw["model_args"])
    regimes = group_medians(raw["regimes"], ("knob", "crops", "prompt", "output"))
    for entry in regimes:
        flops = request_flops(args, entry["crops"], entry["input_tokens"], entry["output_tokens"], entry["top_k"], entry["active_blocks"])
        entry["gflops"] = {k: v / 1e9 for k, v in flops.items()}
        # achieved rate per stage: compute-bound stages run near the device's FLOP rate, decode far below it
        entry["gflops_per_s"] = {k: entry["gflops"][k] / (entry["total_ms" if k == "total" else f"{k}_ms"] / 1e3)
                                 for k in flops if entry["total_ms" if k == "total" else f"{k}_ms"] > 0}
        entry["stage_share"] = {s: entry[f"{s}_ms"] / entry["total_ms"] for s in STAGES}
        entry["dominant_stage"] = max(STAGES, key=lambda s: entry[f"{s}_ms"])
    prefill = group_medians(raw["prefill_sweep"] + raw["regimes"], ("knob", "crops", "prompt"))
    prefill_fit = {knob: linear_fit([p["input_tokens"] for p in prefill if p["knob"] == knob],
                                    [p["prefill_ms"] for p in prefill if p["knob"] == knob]) for knob in sorted({p["knob"] for p in prefill})}
    decode_curves, decode_fit = {}, {}
    for knob in sorted({r["knob"] for r in raw["decode_sweep"]}):
        per_token = np.array([r["decode_ms_per_token"] for r in raw["decode_sweep"] if r["knob"] == knob], float)
        cumulative = np.median(np.cumsum(per_token, axis=1), axis=0)  # decode ms after n decode steps
        output_tokens = np.arange(2, cumulative.size + 2)  # n steps -> n + 1 output tokens (the first is prefill's)
        decode_curves[knob] = {"output_tokens": output_tokens.tolist(), "decode_ms": cumulative.tolist(),
                               "ms_per_token_first_10": float(np.median(per_token[:, :10])), "ms_per_token_last_10": float(np.median(per_token[:, -10:]))}
        decode_fit[knob] = linear_fit(output_tokens, cumulative)
    stage_corr = {}
    for stage in ("vision_encoder", "prefill", "decode", "total"):
        ms = [e["total_ms" if stage == "total" else f"{stage}_ms"] for e in regimes]
        stage_corr[stage] = correlations([e["gflops"][stage] for e in regimes], ms)
    # decode-heavy and prefill-heavy corners of the regime grid at each knob setting
    corners = {}
    for knob in sorted({e["knob"] for e in regimes}):
        mine = [e for e in regimes if e["knob"] == knob]
        longest = max(e["output_tokens"] for e in mine)
        shortest = min(e["output_tokens"] for e in mine)
        most_crops = max(e["crops"] for e in mine)
        decode_heavy = [e["stage_share"]["decode"] for e in mine if e["output_tokens"] == longest]
        prefill_heavy = [e for e in mine if e["output_tokens"] == shortest and e["crops"] == most_crops]
        corners[knob] = {
            "decode_share_at_longest_output": float(np.median(decode_heavy)), "longest_output_tokens": longest,
            "vision_plus_prefill_share_at_shortest_output_most_crops": float(np.median(
                [e["stage_share"]["vision_encoder"] + e["stage_share"]["prefill"] for e in prefill_heavy])),
            "shortest_output_tokens": shortest, "most_crops": most_crops,
            "median_stage_share": {s: float(np.median([e["stage_share"][s] for e in mine])) for s in STAGES},
            "dominant_stage_counts": {s: sum(e["dominant_stage"] == s for e in mine) for s in STAGES},
        }
    operators = []
    for op in raw["operators"]:
        if "error" in op:
            operators.append(op)
            continue
        entry = {k: op[k] for k in ("knob", "crops", "top_k", "active_blocks", "prompt", "input_tokens", "decode_steps", "clock")}
        for phase, data in op["phases"].items():
            total = sum(data["ms"].values())
            entry[phase] = {"ms": data["ms"], "total_ms": total, "share": {c: (data["ms"][c] / total if total else None) for c in CATEGORIES},
                            "per": data["per"], "top": data["top"][:12]}
        operators.append(entry)
    return {
        "label": run_label(raw), "preset": raw["preset"], "device_tag": raw["device_tag"], "device": raw["device"], "dtype": raw["dtype"],
        "weights": raw["weights"], "cuda_graphs": raw["cuda_graphs"], "truncated": raw["truncated"],
        "host_load_average_1min": raw.get("host_load_average_1min"), "spec": raw["spec"], "prompts": raw["prompts"],
        "regimes": regimes, "prefill_points": prefill, "prefill_fit": prefill_fit, "decode_curves": decode_curves, "decode_fit": decode_fit,
        "flops_correlation": stage_corr, "corners": corners, "operators": operators,
    }


def run_key(raw: dict) -> str:
    return f"{raw['preset']}_{raw['device_tag']}"


def analyse(records: Sequence[tuple[Path, dict]], args: Any = None, root: Path | None = None) -> tuple[dict, dict]:
    """(summary, data) for the raw device records (see module doc)."""
    runs = {}
    for path, raw in records:
        key = run_key(raw)
        if key in runs:
            raise ValueError(f"two raw files for {key}: {runs[key]['source']} and {path}")
        runs[key] = analyse_run(raw)
        runs[key]["source"] = _relative(path, root)
    headline = {}
    for key, run in runs.items():
        full = "full" if "full" in run["corners"] else min(run["corners"])
        ops = [o for o in run["operators"] if "error" not in o and o["knob"] == full]
        headline[key] = {
            "label": run["label"],
            "decode_share_at_longest_output_full": run["corners"][full]["decode_share_at_longest_output"],
            "vision_plus_prefill_share_at_shortest_output_most_crops_full": run["corners"][full]["vision_plus_prefill_share_at_shortest_output_most_crops"],
            "median_stage_share_full": run["corners"][full]["median_stage_share"],
            "prefill_ms_per_input_token": {k: f["slope"] for k, f in run["prefill_fit"].items()},
            "decode_ms_per_output_token": {k: f["slope"] for k, f in run["decode_fit"].items()},
            "achieved_gflops_per_s_full_median": {k: float(np.median([e["gflops_per_s"][k] for e in run["regimes"] if e["knob"] == full and k in e["gflops_per_s"]]))
                                                  for k in ("vision_encoder", "prefill", "decode", "total")},
            "flops_vs_total_latency_pearson": run["flops_correlation"]["total"]["pearson"],
            "flops_vs_total_latency_spearman": run["flops_correlation"]["total"]["spearman"],
            "llm_operator_share_full": {phase: {c: float(np.mean([o[phase]["share"][c] for o in ops])) for c in CATEGORIES}
                                        for phase in ("prefill", "decode")} if ops else None,
            "truncated": run["truncated"],
        }
    summary = run_header("e1", args, devices={k: r["device"] for k, r in runs.items()},
                         data_sources={k: r["source"] for k, r in runs.items()}, data_file="results/e1_data.json.gz")
    summary.update(
        title="E1 stage-aware latency decomposition",
        protocol="batch 1, forced output length (ignore_eos), warm-ups discarded, median of the timed repeats per (regime, knobs)",
        operator_categories={"attention": "qkv/out projections, q/k norms, RoPE, KV write, attention kernels",
                             "moe_routing": "router gate projection, softmax, top-k",
                             "moe_experts": "token-expert dispatch, expert SwiGLU matmuls, weighted combine",
                             "other": "pre-norms, embedding, RoPE tables, ln_f, LM head, argmax",
                             "method": "forward-hook record_function ranges on the decoder modules + kernel-name rules (see module docstring)",
                             "kernel_name_rules": [list(r) for r in KERNEL_NAME_RULES]},
        flops="analytical, 2 per multiply-add, real (unpadded) context; see request_flops",
        headline=headline,
    )
    return summary, {"runs": runs}


def _relative(path: Path, root: Path | None) -> str:
    path = Path(path).resolve()
    if root is not None and path.is_relative_to(Path(root).resolve()):
        return str(path.relative_to(Path(root).resolve()))
    return str(path)


def write_results(summary: dict, data: dict, results_dir: Path) -> list[Path]:
    results_dir = Path(results_dir)
    paths = [write_json(results_dir / "e1_summary.json", summary), write_json(results_dir / "e1_data.json.gz", data)]
    return paths + plot_from_results(results_dir)


# ------------------------------------------------------------------------------------------------
# figures


def plot_from_results(results_dir: Path, figures_dir: Path | None = None) -> list[Path]:
    """Rebuild results/figures/e1_*.png from results/e1_data.json.gz."""
    results_dir = Path(results_dir)
    runs = read_json(results_dir / "e1_data.json.gz")["runs"]
    figures = figures_path(results_dir, figures_dir)
    return [_plot_stages(runs, figures / "e1_stage_stack.png"), _plot_scaling(runs, figures / "e1_scaling.png"),
            _plot_operators(runs, figures / "e1_operators.png"), _plot_flops(runs, figures / "e1_flops_vs_latency.png")]


def _plot_stages(runs: dict, path: Path) -> Path:
    plt = pyplot()
    outputs = [label for label, _ in next(iter(runs.values()))["spec"]["output_tokens"]]
    fig, axes = plt.subplots(len(runs), len(outputs), figsize=(5.2 * len(outputs), 3.6 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs.values()):
        knobs = [name for name, _, _ in run["spec"]["knobs"]]
        for ax, output in zip(row, outputs):
            entries = [e for e in run["regimes"] if e["output"] == output]
            groups = sorted({(e["crops"], e["prompt_tokens"], e["prompt"]) for e in entries})
            width = 0.8 / len(knobs)
            for k, knob in enumerate(knobs):
                for g, (crops, _, prompt) in enumerate(groups):
                    match = [e for e in entries if e["knob"] == knob and e["crops"] == crops and e["prompt"] == prompt]
                    if not match:
                        continue
                    bottom = 0.0
                    for stage in STAGES:
                        value = match[0][f"{stage}_ms"]
                        ax.bar(g + (k - (len(knobs) - 1) / 2) * width, value, width, bottom=bottom, color=STAGE_COLORS[stage],
                               hatch="//" if k else None, edgecolor="white", linewidth=0.3,
                               label=stage if (g == 0 and k == 0) else None)
                        bottom += value
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{c}cr\n{p}" for c, _, p in groups], fontsize=7)
            out_tokens = entries[0]["output_tokens"] if entries else "?"
            ax.set_title(f"{run['label']}\noutput {output} ({out_tokens} tok); bars: {' | '.join(knobs)} (hatched)", fontsize=8)
            ax.set_ylabel("median latency (ms)")
        row[0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, 110)


def _plot_scaling(runs: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for (ax1, ax2), run in zip(axes, runs.values()):
        for k, (knob, fit) in enumerate(run["prefill_fit"].items()):
            points = sorted((p["input_tokens"], p["prefill_ms"]) for p in run["prefill_points"] if p["knob"] == knob)
            x, y = np.array(points).T
            ax1.plot(x, y, "o", color=f"C{k}", ms=4, label=f"{knob}")
            if fit["slope"] is not None:
                ax1.plot(x, fit["slope"] * x + fit["intercept"], "-", color=f"C{k}", lw=1,
                         label=f"{knob} fit {1e3 * fit['slope']:.2f} us/token, R²={fit['r2']:.3f}")
        ax1.set_xlabel("input tokens (prefill length)")
        ax1.set_ylabel("prefill ms (median)")
        ax1.set_title(f"{run['label']}\nprefill vs input tokens", fontsize=8)
        ax1.legend(fontsize=7)
        for k, (knob, curve) in enumerate(run["decode_curves"].items()):
            fit = run["decode_fit"][knob]
            ax2.plot(curve["output_tokens"], curve["decode_ms"], "-", color=f"C{k}", label=f"{knob}: {fit['slope']:.3f} ms/token")
            points = [(e["output_tokens"], e["decode_ms"]) for e in run["regimes"] if e["knob"] == knob]
            if points:
                x, y = np.array(points).T
                ax2.plot(x, y, ".", color=f"C{k}", alpha=0.5, ms=4)
        ax2.set_xlabel("output tokens (forced)")
        ax2.set_ylabel("decode ms")
        ax2.set_title(f"{run['label']}\ndecode vs output tokens (line: long request; dots: regimes)", fontsize=8)
        ax2.legend(fontsize=7)
    return save_figure(fig, path, 110)


def _plot_operators(runs: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 0.6 + 0.45 * max(4, 2 * max(len(r["operators"]) for r in runs.values())) * len(runs) / 1.2),
                             squeeze=False)
    colors = dict(zip(CATEGORIES, ("C0", "C3", "C2", "0.6")))
    for ax, run in zip(axes[:, 0], runs.values()):
        labels, y = [], 0
        for op in run["operators"]:
            if "error" in op:
                continue
            for phase in ("prefill", "decode"):
                left = 0.0
                for c in CATEGORIES:
                    share = op[phase]["share"][c] or 0.0
                    ax.barh(y, 100 * share, left=left, color=colors[c], label=c if y == 0 else None)
                    left += 100 * share
                unit = "ms/token" if phase == "decode" else "ms"
                ax.text(101, y, f"{op[phase]['total_ms']:.3g} {unit}", va="center", fontsize=7)
                labels.append(f"{phase}: {op['knob']} (k={op['top_k']}, {op['active_blocks']} blk), {op['crops']}cr/{op['prompt']} ({op['input_tokens']} tok)")
                y += 1
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 118)
        ax.set_xlabel("share of LLM time (%)")
        clock = next((o["clock"] for o in run["operators"] if "clock" in o), "")
        ax.set_title(f"{run['label']}: LLM operator breakdown (torch.profiler, eager, {clock})", fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(labels) <= 4 else -0.15), ncol=4)
    return save_figure(fig, path, 110)


def _plot_flops(runs: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs.values()):
        outputs = sorted({e["output_tokens"] for e in run["regimes"]})
        knobs = [name for name, _, _ in run["spec"]["knobs"]]
        for e in run["regimes"]:
            ax.scatter(e["gflops"]["total"], e["total_ms"], s=16, color=f"C{outputs.index(e['output_tokens'])}",
                       marker="o" if e["knob"] == knobs[0] else "^", alpha=0.8)
        for i, n in enumerate(outputs):
            ax.scatter([], [], color=f"C{i}", s=16, label=f"{n} output tokens")
        for knob, marker in zip(knobs, "o^"):
            ax.scatter([], [], color="k", marker=marker, s=16, label=knob)
        corr = run["flops_correlation"]["total"]
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log range
        ax.set_xlabel("analytical GFLOPs per request")
        ax.set_ylabel("median total latency (ms)")
        ax.set_title(f"{run['label']}\nPearson r={_fmt(corr['pearson'])}, log-log r={_fmt(corr['pearson_log'])}, "
                     f"Spearman={_fmt(corr['spearman'])}", fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, path, 110)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------------------------------------
# shared by the E1 and M2 drivers


def load_for_latency(preset: str, weights: str = "auto", device: str = "cpu", dtype: str = "auto", threads: int = 1):
    """The model a latency study times: `weights="auto"` is micro's shipped weights and seeded random
    weights for molmoe-1b (latency does not depend on the values). `threads` pins torch's CPU
    threads (0: leave torch's default)."""
    import torch

    from ..model.runtime import load_model

    if preset not in ("micro", "molmoe-1b"):
        raise ValueError(f"preset={preset!r} is not valid; allowed: ('micro', 'molmoe-1b')")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads={threads!r} must be an int >= 0 (0: torch's default)")
    if threads:
        torch.set_num_threads(threads)
    if weights == "auto":
        weights = None if preset == "micro" else "random"
    return load_model(preset, weights=weights, device=device, dtype=None if dtype == "auto" else dtype)
