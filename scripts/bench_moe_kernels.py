"""Micro-benchmark of the MoE kernels at MolmoE-1B sizes (E=64, d=2048, H=1024, bf16); writes JSON.

Decode (one token, per block, k in --decode-top-k): the gather-free triton kernels against torch
gathering the chosen experts' weights (w[ids]) for batched matmuls. Each method is captured in a CUDA
graph running --num-weight-sets blocks in a row, each with its own weight tensors, like a decode step
through the layers, so L2 (50 MB on an H100) serves no repeat reads; the median replay over the
blocks gives the time per block. Achieved GB/s counts only the bytes a block must read: the k active
experts' weights plus x, ids, probabilities and output.

Prefill (T in --prefill-tokens, k = --prefill-top-k): triton grouped GEMMs against a torch loop over
experts and torch._grouped_mm where it exists, timed by triton.testing.do_bench (median; it flushes
L2 before each call), rotating among the weight sets too. The measured device-to-device copy rate is
recorded as the memory ceiling. Every method is first checked against the float64 reference.

`--prefill-tiles` sweeps the triton prefill's tiles instead (block_m x block_n x block_k x warps x
stages, those that fit in shared memory) at each --prefill-tokens, each against the default tile of
this card (`moe_kernels.default_prefill_config`); `--sections` picks what runs.

    python scripts/bench_moe_kernels.py --out results/bench_moe_kernels.json
    python scripts/bench_moe_kernels.py --dry-run --out /tmp/moe_dry.json   # CPU, tiny, reference
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
import torch.nn.functional as F


from flexvlm_env.benchmarking import median_ms_graph, median_ms_host  # noqa: E402
from flexvlm_env.model.moe_kernels import (  # noqa: E402
    PrefillConfig,
    card_of,
    default_prefill_config,
    moe_decode_triton,
    moe_prefill_triton,
    moe_reference,
)


@dataclass
class Args:
    out: str = "results/bench_moe_kernels.json"
    """where the JSON goes"""
    num_experts: int = 64
    """experts per block"""
    d_model: int = 2048
    """model width"""
    hidden: int = 1024
    """expert hidden width"""
    decode_top_k: tuple[int, ...] = (1, 2, 4, 8)
    """k values timed for decode"""
    prefill_tokens: tuple[int, ...] = (128, 512, 1300)
    """token counts timed for prefill"""
    prefill_top_k: int = 8
    """k for prefill"""
    num_weight_sets: int = 16
    """separate weight tensors (blocks) rotated through so that L2 holds none of them"""
    decode_replays: int = 100
    """timed graph replays per decode measurement (median reported)"""
    seed: int = 0
    """seed of weights and routing"""
    prefill_tile_block_m: tuple[int, ...] = (64, 128)
    """block_m values of the prefill tile sweep (few pairs per expert: add 16 and 32)"""
    sections: tuple[str, ...] = ("decode", "prefill")
    """which parts run: decode, prefill (methods), prefill_tiles (the triton prefill's tile sweep)"""
    dry_run: bool = False
    """CPU, tiny sizes, the reference in place of triton: checks that the script runs end to end"""


def parse_args() -> Args:
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    if args.dry_run:
        args = dataclasses.replace(args, num_experts=8, d_model=64, hidden=32, prefill_tokens=(16, 40),
                                   num_weight_sets=2, decode_replays=3)
    return args


def make_weight_sets(args: Args, device, dtype):
    def one_set():
        w_gate_up = torch.randn(args.num_experts, 2 * args.hidden, args.d_model, device=device, dtype=dtype)
        w_down = torch.randn(args.num_experts, args.d_model, args.hidden, device=device, dtype=dtype)
        return w_gate_up.mul_(args.d_model**-0.5), w_down.mul_(args.hidden**-0.5)

    return [one_set() for _ in range(args.num_weight_sets)]


def route(num_tokens, top_k, num_experts, device):
    """Router-like ids and probabilities: top-k of a softmax, not renormalised."""
    probs = torch.softmax(torch.randn(num_tokens, num_experts, device=device), dim=-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    return topk_ids, topk_weights


def decode_torch_gather(x, topk_ids, topk_weights, w_gate_up, w_down):
    """What plain torch does for one token: copy the chosen experts' weights, then batched matmuls."""
    ids, hidden = topk_ids[0], w_down.shape[2]
    gate_up = torch.bmm(w_gate_up[ids], x.reshape(1, -1, 1).expand(len(ids), -1, -1))[:, :, 0]
    h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:] * topk_weights[0, :, None].to(x.dtype)
    return torch.bmm(w_down[ids], h[:, :, None]).sum(dim=0).reshape(x.shape)


def prefill_torch_loop(x, topk_ids, topk_weights, w_gate_up, w_down):
    """Plain torch prefill: one pair of matmuls per active expert, in the weights' dtype."""
    top_k, hidden = topk_ids.shape[1], w_down.shape[2]
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        pairs = order[start:start + count]
        start += count
        if count == 0:
            continue
        gate_up = x[pairs // top_k] @ w_gate_up[expert].t()
        h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        y = (h @ w_down[expert].t()) * topk_weights.flatten()[pairs, None].to(x.dtype)
        out.index_add_(0, pairs // top_k, y.float())
    return out.to(x.dtype)


def prefill_torch_grouped_mm(x, topk_ids, topk_weights, w_gate_up, w_down):
    """torch._grouped_mm over pairs sorted by expert (group ends in offs), no padding."""
    top_k, hidden, num_experts = topk_ids.shape[1], w_down.shape[2], w_gate_up.shape[0]
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids.long(), torch.ones_like(flat_ids, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    tokens = order // top_k
    # Transposed views of the [out, in] weights: the column-major [in, out] operand _grouped_mm wants.
    gate_up = torch._grouped_mm(x[tokens], w_gate_up.transpose(1, 2), offs=offs)
    h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs) * topk_weights.flatten()[order, None].to(x.dtype)
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, y.float()).to(x.dtype)


def relative_error(fn, inputs) -> float:
    ref = moe_reference(*(t.double() if t.is_floating_point() else t for t in inputs))
    return ((fn(*inputs).double() - ref).norm() / ref.norm()).item()


def copy_bandwidth_gbps() -> float:
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    time_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / time_ms / 1e6


def bench_decode(args: Args, weight_sets, device, dtype, on_gpu: bool):
    methods = {"triton_gather_free" if on_gpu else "reference (dry run)": moe_decode_triton if on_gpu else moe_reference,
               "torch_gather_bmm": decode_torch_gather}
    rows = []
    for top_k in args.decode_top_k:
        # Static inputs per block, as a captured decode step would have them.
        inputs = [(torch.randn(1, args.d_model, device=device, dtype=dtype), *route(1, top_k, args.num_experts, device),
                   w_gate_up, w_down) for w_gate_up, w_down in weight_sets]
        needed_bytes = (top_k * 3 * args.hidden * args.d_model * dtype.itemsize  # active experts' weights
                        + 2 * args.d_model * dtype.itemsize + top_k * 12)  # x, out, ids (int64), probs
        for name, fn in methods.items():
            row = dict(method=name, top_k=top_k, bytes_needed=needed_bytes)
            try:
                row["rel_err_vs_fp64"] = relative_error(fn, inputs[0])

                def step():
                    for block_inputs in inputs:
                        fn(*block_inputs)

                step_ms = median_ms_graph(step, args.decode_replays) if on_gpu else median_ms_host(step, args.decode_replays)
                row["time_per_block_us"] = step_ms * 1e3 / len(inputs)
                row["achieved_GBps"] = needed_bytes / (row["time_per_block_us"] * 1e3)
            except Exception as error:  # record and go on: one failing method must not lose the others
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            print(f"decode k={top_k:2d} {name:22s} " + (f"{row['time_per_block_us']:8.2f} us/block "
                  f"{row['achieved_GBps']:7.0f} GB/s  rel err {row['rel_err_vs_fp64']:.1e}" if "error" not in row
                  else row["error"][:200]))
    return rows


def bench_prefill(args: Args, weight_sets, device, dtype, on_gpu: bool):
    methods = {"triton_grouped" if on_gpu else "reference (dry run)": moe_prefill_triton if on_gpu else moe_reference,
               "torch_expert_loop": prefill_torch_loop}
    if hasattr(torch, "_grouped_mm"):
        methods["torch_grouped_mm"] = prefill_torch_grouped_mm
    rows = []
    for num_tokens in args.prefill_tokens:
        inputs, flops = prefill_inputs(args, num_tokens, weight_sets, device, dtype)
        for name, fn in methods.items():
            row = dict(method=name, num_tokens=num_tokens, top_k=args.prefill_top_k, flops=flops)
            rows.append(time_prefill(row, fn, inputs, flops, on_gpu))
            print(f"prefill T={num_tokens:4d} k={args.prefill_top_k} {name:22s} " + (
                f"{row['time_ms']:8.3f} ms {row['achieved_TFLOPs']:6.1f} TFLOP/s  rel err {row['rel_err_vs_fp64']:.1e}"
                if "error" not in row else row["error"][:200]))
    return rows


def prefill_inputs(args: Args, num_tokens: int, weight_sets, device, dtype):
    """Per weight set (x, ids, probabilities, w_gate_up, w_down) of `num_tokens` tokens, and the FLOPs of a call."""
    inputs = [(torch.randn(num_tokens, args.d_model, device=device, dtype=dtype),
               *route(num_tokens, args.prefill_top_k, args.num_experts, device), w_gate_up, w_down)
              for w_gate_up, w_down in weight_sets]
    return inputs, 2 * num_tokens * args.prefill_top_k * 3 * args.hidden * args.d_model


def time_prefill(row: dict, fn, inputs, flops: int, on_gpu: bool) -> dict:
    """Fills row with fn's error against float64 and its median time over calls rotating among the
    weight sets (triton's do_bench on the GPU); an exception is recorded, not raised, so that one
    failing method or tile does not lose the others."""
    try:
        row["rel_err_vs_fp64"] = relative_error(fn, inputs[0])
        rotation = itertools.count()

        def call():
            fn(*inputs[next(rotation) % len(inputs)])

        if on_gpu:
            import triton.testing

            row["time_ms"] = triton.testing.do_bench(call, return_mode="median")
        else:
            row["time_ms"] = median_ms_host(call, 3)
        row["achieved_TFLOPs"] = flops / row["time_ms"] / 1e9
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"
    return row


PREFILL_TILE_GRID = dict(block_m=(64, 128), block_n=(64, 128, 256), block_k=(64, 128), num_warps=(4, 8),
                         num_stages=(3, 4))
SHARED_MEMORY_BYTES = 200 * 1024  # below an H100/H200 SM's 227 KB, leaving room for the epilogue


def bench_prefill_tiles(args: Args, weight_sets, device, dtype, on_gpu: bool):
    """The triton prefill at each tile of PREFILL_TILE_GRID that fits in shared memory (the default
    tile only on the dry run), timed like `bench_prefill`; rows say which is the card's default."""
    card = card_of(torch.device(device))
    rows = []
    for num_tokens in args.prefill_tokens:
        inputs, flops = prefill_inputs(args, num_tokens, weight_sets, device, dtype)
        default = default_prefill_config(num_tokens * args.prefill_top_k, args.num_experts, dtype.itemsize, card)
        grid = {**PREFILL_TILE_GRID, "block_m": args.prefill_tile_block_m}
        tiles = [PrefillConfig(*t) for t in itertools.product(*grid.values())
                 if (t[0] * t[2] + t[2] * t[1]) * dtype.itemsize * t[4] <= SHARED_MEMORY_BYTES]
        for config in ([default] + [t for t in tiles if t != default]) if on_gpu else [default]:
            row = dict(method="triton_grouped", num_tokens=num_tokens, top_k=args.prefill_top_k, card=card,
                       **dataclasses.asdict(config), default=config == default)
            fn = (lambda *a, config=config: moe_prefill_triton(*a, config=config)) if on_gpu else moe_reference
            rows.append(time_prefill(row, fn, inputs, flops, on_gpu))
        timed = [r for r in rows if r["num_tokens"] == num_tokens and "time_ms" in r]
        best = min(timed, key=lambda r: r["time_ms"])
        shipped = next(r for r in timed if r["default"])
        print(f"prefill tiles T={num_tokens} ({card}): default {shipped['block_m']}/{shipped['block_n']}/"
              f"{shipped['block_k']}/{shipped['num_warps']}/{shipped['num_stages']} {shipped['time_ms']:.3f} ms, best "
              f"{best['block_m']}/{best['block_n']}/{best['block_k']}/{best['num_warps']}/{best['num_stages']} "
              f"{best['time_ms']:.3f} ms ({best['achieved_TFLOPs']:.0f} TFLOP/s)", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    if not args.prefill_tile_block_m or any(m < 16 or m & (m - 1) for m in args.prefill_tile_block_m):
        raise SystemExit(f"--prefill-tile-block-m {args.prefill_tile_block_m}: powers of two >= 16 (tl.dot's minimum)")
    unknown = set(args.sections) - {"decode", "prefill", "prefill_tiles"}
    if not args.sections or unknown:
        raise SystemExit(f"--sections {args.sections}: allowed decode, prefill, prefill_tiles (at least one)")
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    torch.manual_seed(args.seed)
    meta = dict(args=dataclasses.asdict(args), dtype=str(dtype), device=device, torch=torch.__version__,
                python=platform.python_version(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                timing="decode: CUDA-graph replay of num_weight_sets blocks, median; prefill: triton do_bench median")
    if on_gpu:
        import triton

        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                    triton=triton.__version__, l2_bytes=getattr(props, "L2_cache_size", None))
        meta["copy_bandwidth_GBps"] = copy_bandwidth_gbps()
        print(f"{props.name}: device-to-device copy {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    weight_sets = make_weight_sets(args, device, dtype)
    print(f"E={args.num_experts} d={args.d_model} H={args.hidden} {dtype} on {meta.get('gpu', 'cpu')}, "
          f"{args.num_weight_sets} weight sets")
    sections = {"decode": bench_decode, "prefill": bench_prefill, "prefill_tiles": bench_prefill_tiles}
    result = dict(meta=meta)
    for name in args.sections:
        result[name] = sections[name](args, weight_sets, device, dtype, on_gpu)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
