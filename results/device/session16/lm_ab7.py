"""Session 16: the shipped decision kernel (token tree, TF32x3, zero copy) at 4 (default) and 2 warps against a
variant with full-width projections and heads separated by masking columns (.devscratch/s16/lm_gpu_masked.py:
5 + 2 NH + 1 products a layer's attention instead of 8 NH) at 4 and 2 warps. Same 500 observations, alternated
twice; agreement with NumPy; graph replay GPU time. Usage: lm_ab7.py OUT_JSON"""
import importlib.util, json, sys
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents.lm_gpu import GPUDecoder
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
spec = importlib.util.spec_from_file_location("lm_gpu_masked", ".devscratch/s16/lm_gpu_masked.py")
masked = importlib.util.module_from_spec(spec); spec.loader.exec_module(masked)
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
def row(**r):
    out["rows"].append(r); print(r, flush=True)
def with_warps(d, w):
    d.packed.num_warps = w
    return d
for kind in ("dpo", "grpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    batch = as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]})
    cpu_idx = c.select_indices(batch)
    prompts = c.prompt_ids(batch)
    args = (c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
    decoders = {"shipped w4 (default)": GPUDecoder(*args), "shipped w2": with_warps(GPUDecoder(*args), 2),
                "masked w4": masked.GPUDecoder(*args), "masked w2": with_warps(masked.GPUDecoder(*args), 2)}
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
