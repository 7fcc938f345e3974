"""Session 17: the shipped decision kernel (session 16: token tree, TF32x3, zero copy) against the kernel with
layer 0 read from per-(token, position) tables (agents/lm_gpu.py now), with and without each later layer's value
and output projections folded into one [D, D] product per head (FOLD_VO), TF32x3 at 4 warps; IEEE at 8 warps for
the shipped and table kernels. Same 500 observations, alternated twice; agreement with NumPy (one observation and
batched); graph replay GPU time (200 back-to-back replays, CUDA events). Usage: lm_ab8.py OUT_JSON [ONLY_W8]"""
import importlib.util, json, sys
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents.lm_gpu import GPUDecoder
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
spec = importlib.util.spec_from_file_location("lm_gpu_shipped", ".devscratch/s17/lm_gpu_shipped.py")
shipped = importlib.util.module_from_spec(spec); spec.loader.exec_module(shipped)
only_w8 = len(sys.argv) > 2
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
def row(**r):
    out["rows"].append(r); print(r, flush=True)
def setup(d, warps=None, fold=False):
    if warps: d.packed.num_warps = warps
    d.packed.fold_vo = fold
    return d
for kind in ("dpo", "grpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    batch = as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]})
    cpu_idx = c.select_indices(batch)
    prompts = c.prompt_ids(batch)
    args = (c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
    if only_w8:
        decoders = {"table tf32x3 w8": setup(GPUDecoder(*args), 8)}
    else:
        decoders = {"shipped tf32x3 w4": shipped.GPUDecoder(*args), "table tf32x3 w4": GPUDecoder(*args),
                    "table+foldvo tf32x3 w4": setup(GPUDecoder(*args), fold=True),
                    "shipped ieee w8": shipped.GPUDecoder(*args, precision="ieee"),
                    "table ieee w8": GPUDecoder(*args, precision="ieee")}
    for rep in range(2):
        for name, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([c.select_index(o) for o in obs])
            row(kind=kind, path=name, rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)),
                agree=float(np.mean(idx == cpu_idx)), batched_agree=float(np.mean(c.vocabulary.config_index(d.decide(prompts)) == cpu_idx)))
    for name, d in decoders.items():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for rep in range(2):
            start.record()
            for _ in range(200):
                d._graph.replay()
            end.record(); torch.cuda.synchronize()
            row(kind=kind, path=f"graph_replay_gpu_time_{name}", rep=rep, median_ms=start.elapsed_time(end) / 200)
    c.gpu_decoder = None
json.dump(out, open(sys.argv[1], "w"), indent=1)
