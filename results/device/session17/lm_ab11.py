"""Session 17, final call: session 16's decision kernel against the final one (agents/lm_gpu.py: layer-0
tables, MLP chunks of 32, mask rebuilt per use), DPO and GRPO, the same 500 observations, alternated twice:
select_config time, agreement with NumPy (one observation and batched), then GPU time of 200 back-to-back
graph replays (CUDA events), alternated twice. Usage: lm_ab11.py OUT_JSON"""
import importlib.util, json, sys
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents import lm_gpu
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
spec = importlib.util.spec_from_file_location("lm_gpu_shipped", ".devscratch/s17/lm_gpu_shipped.py")
shipped = importlib.util.module_from_spec(spec); spec.loader.exec_module(shipped)
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "triton": lm_gpu.triton.__version__, "n_observations": len(obs), "rows": []}
def row(**r):
    out["rows"].append(r); print(r, flush=True)
for kind in ("grpo", "dpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    batch = as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]})
    cpu_idx = c.select_indices(batch)
    prompts = c.prompt_ids(batch)
    args = (c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
    decoders = {"session 16": shipped.GPUDecoder(*args), "final": lm_gpu.GPUDecoder(*args)}
    for rep in range(2):
        for name, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([c.select_index(o) for o in obs])
            row(kind=kind, path=name, rep=rep, precision=d.packed.precision, median_ms=float(np.median(t)),
                p95_ms=float(np.percentile(t, 95)), agree=float(np.mean(idx == cpu_idx)),
                batched_agree=float(np.mean(c.vocabulary.config_index(d.decide(prompts)) == cpu_idx)))
    for rep in range(2):
        for name, d in decoders.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(200):
                d._graph.replay()
            end.record(); torch.cuda.synchronize()
            row(kind=kind, path=f"graph_replay_gpu_time {name}", rep=rep, median_ms=start.elapsed_time(end) / 200)
    c.gpu_decoder = None
json.dump(out, open(sys.argv[1], "w"), indent=1)
