"""Session 16: batch-1 decisions on the GPU host. LM controllers (DPO, GRPO): session 15's sequential kernel
(three forward passes, .devscratch/lm_gpu_seq.py) against the token-tree kernel (one pass, agents/lm_gpu.py)
at several warp counts, both behind the new one-observation host path; the tree kernel behind the old batch
path too; graph-replay GPU time of each; agreement with NumPy. MLP controllers: the new one-observation path
against the batch path. Alternated twice on the same observations. Usage: lm_ab3.py OUT_JSON"""
import importlib.util, json, sys
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents.lm_gpu import GPUDecoder
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
spec = importlib.util.spec_from_file_location("lm_gpu_seq", ".devscratch/lm_gpu_seq.py")
seq = importlib.util.module_from_spec(spec); spec.loader.exec_module(seq)
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
def row(**r):
    out["rows"].append(r); print(r, flush=True)
def batch_path(c):
    return lambda o: c.select_indices(as_batch(o))
for kind in ("dpo", "grpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    cpu_idx = c.select_indices(as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]}))
    decoders = {f"seq_w{w}": seq.GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", num_warps=w) for w in (4, 8)}
    decoders.update({f"tree_w{w}": GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda", num_warps=w) for w in (2, 4, 8, 16)})
    for rep in range(2):
        for name, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([c.select_index(o) for o in obs])
            row(kind=kind, path=name, rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)),
                agree=float(np.mean(idx == cpu_idx)))
        c.gpu_decoder = decoders["tree_w4"]
        t = time_calls_ms(batch_path(c), obs)
        row(kind=kind, path="tree_w4_old_batch_host_path", rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)))
    for name, d in decoders.items():  # kernel + copies alone: CUDA events around 200 back-to-back graph replays
        d.decide(c.prompt_ids(obs[0]))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for rep in range(2):
            start.record()
            for _ in range(200):
                d._graph.replay()
            end.record(); torch.cuda.synchronize()
            row(kind=kind, path=f"graph_replay_gpu_time_{name}", rep=rep, median_ms=start.elapsed_time(end) / 200)
    c.gpu_decoder = None
for source, names in (("micro-h200-measured", ("flexvlm", "full")), ("molmoe-1b-h100", ("flexvlm",))):
    o_src = m3.replay_observations(source, 500, 0)
    for name in names:
        c = load_controller(f"results/e4_controllers/{source}/{name}")
        for rep in range(2):
            for path, fn in (("one_observation", c.select_config), ("batch_path", batch_path(c))):
                t = time_calls_ms(fn, o_src)
                row(kind=f"{source}/{name}", path=path, rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)))
for name in ("ppo", "maskable_ppo", "supervised"):
    c = load_controller(f"results/m3_controllers/{name}")
    for rep in range(2):
        for path, fn in (("one_observation", c.select_config), ("batch_path", batch_path(c))):
            t = time_calls_ms(fn, obs)
            row(kind=f"e5_{name}", path=path, rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)))
json.dump(out, open(sys.argv[1], "w"), indent=1)
