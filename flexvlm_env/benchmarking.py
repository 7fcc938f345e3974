"""Runtime benchmarking: the measurement protocol, the byte count of a decode step, the HF baseline.

Protocol (EXPERIMENTS.md): batch 1, warm-up runs discarded (on CUDA they also capture every decode
graph), then timed repeats; rows hold medians. A decode step's bytes are counted as the weights a
token really reads — attention, router, the *active* experts of the *active* blocks, LM head — plus
the KV cache it attends over, so achieved GB/s and % of the bandwidth floor are honest. The
Hugging Face baseline is `transformers`' OLMoE (the same decoder) with random weights, timed the
same way, so both engines are compared in one run on one card.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import Config
from .model.args import ModelArgs


def device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            ).stdout.strip().splitlines()[:1]
            # nvidia-smi lists every GPU of the host whatever CUDA_VISIBLE_DEVICES says; one host has one driver.
            info["driver"] = info["driver"][0] if info["driver"] else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["device_name"] = info["cpu"]
    return info


def measure_copy_bandwidth_gbps(device: torch.device, size_mb: int = 1024, repeats: int = 20) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), the practical ceiling."""
    if device.type != "cuda":
        return None
    src = torch.empty(size_mb * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return 2 * src.numel() / seconds / 1e9


def median_ms_host(step, repeats) -> float:
    """CPU (dry run) timing: median of host wall-clock times."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms_graph(step, replays) -> float:
    """Capture `step` in a CUDA graph and return the median time of its replays, by device events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles triton kernels) off the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_bytes_per_token(args: ModelArgs, top_k: Sequence[int], plan: Sequence[int], context_len: int, dtype_bytes: int) -> int:
    """Bytes one decode step must read: active blocks' attention, norms, router and top_k experts,
    the LM head, one embedding row and the KV of `context_len` positions per active block."""
    d, h, e = args.d_model, args.expert_hidden, args.n_experts
    per_block_fixed = 4 * d * d + 4 * d + e * d  # att_proj (3d^2) + attn_out (d^2), 4 norms, router
    params = sum(per_block_fixed + top_k[b] * 3 * h * d for b in plan)
    params += args.embedding_size * d + d + d  # LM head, ln_f, embedding row
    kv = len(plan) * 2 * context_len * d
    return (params + kv) * dtype_bytes


def distribution_summary(values) -> dict:
    """Statistics the latency protocol reports for repeated measurements: mean, median, P95, P99, std, CoV, n."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("distribution_summary needs at least one value")
    mean = float(values.mean())
    return {"mean": mean, "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "std": float(values.std()), "cov": float(values.std() / mean) if mean else None,
            "n": int(values.size)}


def _median(values):
    return float(statistics.median(values)) if values else None


def bench_flexvlm_config(vlm, image, prompt: str, config: Config, output_tokens: int, repeats: int, warmup: int, bandwidth_gbps: float | None) -> list[dict]:
    """Two rows for one config: instrumented (stage times) and uninstrumented (end-to-end only)."""
    for _ in range(warmup):
        vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True)
    timed, plain = [], []
    for _ in range(repeats):  # interleaved, so that drift (clocks, other load) hits both alike
        timed.append(vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True))
        plain.append(vlm.generate(image, prompt, config, max_new_tokens=output_tokens, ignore_eos=True, timing=False))
    first = timed[0]
    # With random bf16 weights the logits are nearly flat, so a last-bit difference can flip a
    # greedy token; the count is recorded rather than asserted (tests assert it on real margins).
    identical = sum(r.token_ids == first.token_ids for r in timed + plain) / len(timed + plain)
    base = {
        "engine": "flexvlm",
        "outputs_identical_frac": identical,
        "crops": config.crops,
        "top_k": config.top_k,
        "active_blocks": config.active_blocks,
        "vision_tokens": first.tokens.vision,
        "prompt_tokens": first.tokens.prompt,
        "input_tokens": first.tokens.input,
        "output_tokens": first.tokens.output,
    }
    lat = [r.latency for r in timed]
    per_token = _median([float(np.mean(l.decode_ms_per_token)) for l in lat if l.decode_ms_per_token])
    row = dict(
        base,
        instrumented=True,
        preprocess_ms=_median([l.preprocess_ms for l in lat]),
        vision_encoder_ms=_median([l.vision_encoder_ms for l in lat]),
        projector_ms=_median([l.projector_ms for l in lat]),
        prefill_ms=_median([l.prefill_ms for l in lat]),
        ttft_ms=_median([l.ttft_ms for l in lat]),
        decode_ms=_median([l.decode_ms for l in lat]),
        decode_ms_per_token=per_token,
        total_ms=_median([l.total_ms for l in lat]),
        stage_sum_over_total=_median([l.stage_sum_ms / l.total_ms for l in lat]),
        total_ms_p95=float(np.percentile([l.total_ms for l in lat], 95)),
    )
    if per_token:
        dtype_bytes = torch.finfo(vlm.dtype).bits // 8
        top_k = config.top_k_per_block(vlm.args.n_layers)
        context = first.tokens.input + output_tokens // 2  # mean context over the decode
        nbytes = decode_bytes_per_token(vlm.args, top_k, first.plan, context, dtype_bytes)
        row["decode_bytes_per_token"] = nbytes
        row["achieved_gbps"] = nbytes / (per_token / 1e3) / 1e9
        if bandwidth_gbps:
            row["bandwidth_floor_ms"] = nbytes / (bandwidth_gbps * 1e9) * 1e3
            row["pct_of_bandwidth_floor"] = 100 * row["bandwidth_floor_ms"] / per_token
    plain_row = dict(base, instrumented=False, total_ms=_median([r.latency.total_ms for r in plain]))
    row["timing_overhead_pct"] = 100 * (row["total_ms"] / plain_row["total_ms"] - 1)
    return [row, plain_row]


@dataclass
class HFBaseline:
    """`transformers` OLMoE with MolmoE-1B's decoder sizes and random bf16 weights."""

    model: object
    implementation: str

    @classmethod
    def build(cls, args: ModelArgs, device, top_k: int, implementation: str):
        from transformers import OlmoeConfig, OlmoeForCausalLM

        config = OlmoeConfig(
            vocab_size=args.embedding_size,
            hidden_size=args.d_model,
            intermediate_size=args.expert_hidden,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            num_experts=args.n_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=args.norm_topk_prob,
            max_position_embeddings=4096,
        )
        with torch.device(device):
            model = OlmoeForCausalLM._from_config(config, dtype=torch.bfloat16, experts_implementation=implementation)
        return cls(model.eval(), implementation)

    @torch.inference_mode()
    def time_request(self, input_len: int, output_tokens: int, repeats: int, warmup: int) -> dict:
        """Median prefill ms (input_len tokens, first token included) and decode ms/token."""
        device = next(self.model.parameters()).device
        ids = torch.randint(10, 50000, (1, input_len), device=device)

        def run(n_new):
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=1)
            torch.cuda.synchronize()
            return (time.perf_counter() - start) * 1e3

        for _ in range(warmup):
            run(output_tokens)
        prefill = [run(1) for _ in range(repeats)]
        full = [run(output_tokens) for _ in range(repeats)]
        prefill_ms = _median(prefill)
        return {"prefill_ms": prefill_ms, "decode_ms_per_token": (_median(full) - prefill_ms) / (output_tokens - 1), "total_ms": _median(full)}


def profile_decode_kernels(vlm, image, prompt: str, config: Config, steps: int = 20) -> list[dict]:
    """Device time per kernel of one decode step (the fast path's kernels, run eagerly under the
    PyTorch profiler so each kernel is seen; launch gaps do not count), averaged over `steps`.

    Returns rows {kernel, calls_per_token, us_per_token} sorted by time, so the share of attention,
    MoE, norms, projections and the LM head in a decode token can be read off directly.
    """
    from torch.profiler import ProfilerActivity, profile

    from .model.generate import decode_one_token

    result = vlm.generate(image, prompt, config, max_new_tokens=2, ignore_eos=True)
    plan, top_k = vlm.plan(config), config.top_k_per_block(vlm.args.n_layers)
    slot_range = torch.arange(vlm._cache.max_seq, device=vlm.device)
    token = torch.tensor([[result.token_ids[-1]]], device=vlm.device)
    slot = torch.tensor([result.tokens.input + 1], device=vlm.device)
    fused = getattr(vlm, "fused_decode", False)
    with torch.inference_mode():
        for _ in range(3):
            decode_one_token(vlm.module, token, slot, plan, top_k, vlm._cache, slot_range, fused=fused)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decode_one_token(vlm.module, token, slot, plan, top_k, vlm._cache, slot_range, fused=fused)
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals.setdefault(event.name, []).append(event.time_range.elapsed_us())  # the kernel's own span
    rows = [
        {"kernel": name[:120], "calls_per_token": len(times) / steps, "us_per_token": sum(times) / steps}
        for name, times in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["us_per_token"])
