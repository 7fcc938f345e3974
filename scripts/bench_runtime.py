"""Per-stage latency of the runtime over a knob grid, with and without instrumentation (JSON out).

Examples:
    python scripts/bench_runtime.py --preset micro --out results/bench_runtime_cpu.json
    python scripts/bench_runtime.py --preset molmoe-1b --weights random --hf-baseline \
        --out results/bench_runtime_h100.json          # on a GPU

Protocol: batch 1, a synthetic 1024x768 image (12 crops -> a 3x4 tiling), a short prompt, output
forced to `--output-tokens`; `--warmup` discarded runs, then `--repeats` timed ones; medians.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from PIL import Image

from flexvlm_env import Config, load_model
from flexvlm_env.benchmarking import HFBaseline, bench_flexvlm_config, device_info, measure_copy_bandwidth_gbps

PROMPT = "What is the color of the large circle in the picture? Answer briefly."


@dataclass
class Args:
    preset: str = "micro"
    """model preset: micro or molmoe-1b"""
    weights: str = "random"
    """checkpoint dir, hub id, or 'random' (latency does not depend on weight values)"""
    device: str = ""
    """cpu / cuda (default: cuda when available)"""
    crops: str = "1,4,12"
    """comma-separated crop counts"""
    top_k: str = "1,4,8"
    """comma-separated top_k values"""
    active_blocks: str = "8,12,16"
    """comma-separated active block counts"""
    grid: str = "sweep"
    """'sweep': each knob swept with the others at full; 'full': the cartesian product"""
    output_tokens: int = 64
    """generated tokens per request (EOS ignored)"""
    repeats: int = 5
    """timed runs per config"""
    warmup: int = 2
    """discarded runs per config"""
    hf_baseline: bool = False
    """also time transformers' OLMoE (same decoder) on the same card"""
    hf_implementations: str = "eager,grouped_mm,batched_mm"
    """transformers experts backends to try; the best is reported"""
    threads: int = 0
    """CPU threads (0: torch default)"""
    out: str = ""
    """JSON output path (default results/bench_runtime_<device>.json)"""


def parse_args() -> Args:
    return tyro.cli(Args, description=__doc__.splitlines()[0])


def configs(args: Args) -> list[Config]:
    crops = [int(x) for x in args.crops.split(",")]
    top_k = [int(x) for x in args.top_k.split(",")]
    blocks = [int(x) for x in args.active_blocks.split(",")]
    if args.grid == "full":
        return [Config(crops=c, top_k=k, active_blocks=b) for c in crops for k in top_k for b in blocks]
    if args.grid != "sweep":
        raise ValueError(f"--grid={args.grid!r}; allowed: sweep, full")
    full = Config(crops=max(crops), top_k=max(top_k), active_blocks=max(blocks))
    out = [full]
    out += [Config(crops=c, top_k=full.top_k, active_blocks=full.active_blocks) for c in crops if c != full.crops]
    out += [Config(crops=full.crops, top_k=k, active_blocks=full.active_blocks) for k in top_k if k != full.top_k]
    out += [Config(crops=full.crops, top_k=full.top_k, active_blocks=b) for b in blocks if b != full.active_blocks]
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    vlm = load_model(args.preset, weights=args.weights, device=device)
    load_s = time.perf_counter() - started
    info = device_info(device)
    bandwidth = measure_copy_bandwidth_gbps(device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    grid = configs(args)
    started = time.perf_counter()
    capture_ms = vlm.warmup(grid, image=image, prompt=PROMPT)
    warmup_s = time.perf_counter() - started
    rows = []
    for config in grid:
        for row in bench_flexvlm_config(vlm, image, PROMPT, config, args.output_tokens, args.repeats, args.warmup, bandwidth):
            rows.append(dict(row, preset=args.preset, device=info["device_name"], dtype=str(vlm.dtype).replace("torch.", "")))
            if row["instrumented"]:
                print(
                    f"{args.preset} crops={config.crops:2d} top_k={config.top_k} blocks={config.active_blocks:2d} "
                    f"in={row['input_tokens']:4d} | vision {row['vision_encoder_ms']:7.2f} proj {row['projector_ms']:6.2f} "
                    f"prefill {row['prefill_ms']:7.2f} ttft {row['ttft_ms']:7.2f} | decode/token {row['decode_ms_per_token']:7.3f} "
                    f"({row.get('achieved_gbps', 0):6.0f} GB/s, {row.get('pct_of_bandwidth_floor', float('nan')):4.1f}% of floor) "
                    f"| total {row['total_ms']:8.2f} ms, timing overhead {row['timing_overhead_pct']:+.2f}%",
                    flush=True,
                )
    hf_rows = []
    if args.hf_baseline:
        if device.type != "cuda":
            sys.exit("--hf-baseline needs a CUDA device")
        full_row = next(r for r in rows if r["instrumented"] and r["crops"] == max(c.crops for c in grid) and r["top_k"] == vlm.args.top_k and r["active_blocks"] == vlm.args.n_layers)
        input_len = full_row["input_tokens"]
        vlm_args = vlm.args
        del vlm
        torch.cuda.empty_cache()
        for top_k in sorted({c.top_k for c in grid}, reverse=True):
            best = None
            for impl in args.hf_implementations.split(","):
                try:
                    baseline = HFBaseline.build(vlm_args, device, top_k, impl)
                    timing = baseline.time_request(input_len, args.output_tokens, max(2, args.repeats // 2), 1)
                except Exception as err:  # a backend missing in this transformers version
                    print(f"hf-transformers experts={impl}: unavailable ({type(err).__name__}: {err})", flush=True)
                    continue
                finally:
                    baseline = None
                    torch.cuda.empty_cache()
                print(f"hf-transformers experts={impl} top_k={top_k} in={input_len}: prefill {timing['prefill_ms']:.2f} ms, decode/token {timing['decode_ms_per_token']:.3f} ms", flush=True)
                if best is None or timing["decode_ms_per_token"] < best[1]["decode_ms_per_token"]:
                    best = (impl, timing)
            if best:
                hf_rows.append(dict(
                    engine="hf-transformers", experts_implementation=best[0], preset=args.preset, device=info["device_name"],
                    dtype="bfloat16", crops=None, top_k=top_k, active_blocks=vlm_args.n_layers, input_tokens=input_len,
                    output_tokens=args.output_tokens, instrumented=False, **best[1],
                ))
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    result = {
        "benchmark": "bench_runtime",
        "args": asdict(args),
        "device_info": info,
        "copy_bandwidth_gbps": bandwidth,
        "load_s": load_s,
        "warmup_and_graph_capture_s": warmup_s,
        "graph_capture_ms": {str(k): v for k, v in capture_ms.items()},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "prompt": PROMPT,
        "image_size_wh": [1024, 768],
        "rows": rows + hf_rows,
    }
    suffix = "cpu" if device.type == "cpu" else info["device_name"].split()[1].lower() if len(info["device_name"].split()) > 1 else "gpu"
    out = Path(args.out or f"results/bench_runtime_{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
