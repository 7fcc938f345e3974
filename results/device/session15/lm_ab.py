"""Session 15: the LM controllers' batch-1 decision on the GPU host, NumPy (CPU) vs the Triton kernel
(agents/lm_gpu.py) at 1/2/4/8 warps, same observations, alternated twice; agreement of the decisions;
the kernel's own GPU time from CUDA events over graph replays. Usage: lm_ab.py OUT_JSON"""
import json, sys, time
import numpy as np, torch
from agents.base import load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents.lm_gpu import GPUDecoder
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
for kind in ("dpo", "grpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    cpu_idx = np.array([int(c.select_indices({k: np.asarray(v)[None] for k, v in o.items()})[0]) for o in obs])
    decoders = {w: GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", num_warps=w) for w in (1, 2, 4, 8)}
    for rep in range(2):
        c.use_device("cpu")
        t = time_calls_ms(c.select_config, obs)
        out["rows"].append({"kind": kind, "path": "numpy", "rep": rep, "median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95))})
        for w, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([int(c.select_indices({k: np.asarray(v)[None] for k, v in o.items()})[0]) for o in obs])
            out["rows"].append({"kind": kind, "path": f"triton_w{w}", "rep": rep, "median_ms": float(np.median(t)),
                                "p95_ms": float(np.percentile(t, 95)), "agree": float(np.mean(idx == cpu_idx))})
    # kernel + copies alone: CUDA events around 200 graph replays
    d = decoders[4]; d.decide(c.prompt_ids({k: np.asarray(v)[None] for k, v in obs[0].items()}))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        d._graph.replay()
    end.record(); torch.cuda.synchronize()
    out["rows"].append({"kind": kind, "path": "graph_replay_gpu_time_w4", "median_ms": start.elapsed_time(end) / 200})
    # host-side pieces of one decision
    one = {k: np.asarray(v)[None] for k, v in obs[0].items()}
    t = time_calls_ms(lambda o: c.prompt_ids(o), [one] * 300)
    out["rows"].append({"kind": kind, "path": "prompt_ids_only", "median_ms": float(np.median(t))})
for r in out["rows"]:
    print(r)
json.dump(out, open(sys.argv[1], "w"), indent=1)
