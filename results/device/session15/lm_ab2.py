"""Session 15, call 3: the LM controllers' batch-1 decision on the GPU host: NumPy (CPU), call 1's kernel
(per-head projections, `lm_gpu_v1.py`) and the full-width kernel (agents/lm_gpu.py) at 4 and 8 warps,
alternated twice on the same 500 observations; agreement with NumPy; GPU time of one graph replay
(CUDA events over 200). Usage: lm_ab2.py OUT_JSON"""
import importlib.util, json, sys
from pathlib import Path
import numpy as np, torch
from agents.base import load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents.lm_gpu import GPUDecoder
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3

spec = importlib.util.spec_from_file_location("agents.lm_gpu_v1", Path(__file__).with_name("lm_gpu_v1.py"))
v1 = importlib.util.module_from_spec(spec); sys.modules["agents.lm_gpu_v1"] = v1; spec.loader.exec_module(v1)
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
one = lambda o: {k: np.asarray(v)[None] for k, v in o.items()}
for kind in ("dpo", "grpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    cpu_idx = np.array([int(c.select_indices(one(o))[0]) for o in obs])
    decoders = {"v1_w4": v1.GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", num_warps=4),
                "full_w4": GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", num_warps=4),
                "full_w8": GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", num_warps=8)}
    for rep in range(2):
        c.gpu_decoder = None
        t = time_calls_ms(c.select_config, obs)
        out["rows"].append({"kind": kind, "path": "numpy", "rep": rep, "median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95))})
        for name, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([int(c.select_indices(one(o))[0]) for o in obs])
            out["rows"].append({"kind": kind, "path": name, "rep": rep, "median_ms": float(np.median(t)),
                                "p95_ms": float(np.percentile(t, 95)), "agree": float(np.mean(idx == cpu_idx))})
    for name, d in decoders.items():
        d.decide(c.prompt_ids(one(obs[0])))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            d._graph.replay()
        end.record(); torch.cuda.synchronize()
        out["rows"].append({"kind": kind, "path": f"graph_replay_gpu_time_{name}", "median_ms": start.elapsed_time(end) / 200})
for r in out["rows"]:
    print(r)
json.dump(out, open(sys.argv[1], "w"), indent=1)
