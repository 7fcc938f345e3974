"""Session 17, call 4: decision-kernel variants (v3 = agents/lm_gpu.py then; v4: layer-0 heads unrolled; v5: v4 with gate and up in one product), GRPO and DPO, graph replay GPU time (200 back-to-back replays, CUDA
events, alternated twice) and select_config time on the same 500 observations, every decision compared with
NumPy's; then the stamped time line of v5. Usage: lm_ab9.py OUT_JSON"""
import importlib.util, json, sys, time
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH, prompt_ids_one
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
def module(path, name):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m); return m
S = ".devscratch/s17/"
variants = [("shipped (s16)", S + "lm_gpu_shipped.py", None), ("v3 chunk 32", S + "lm_gpu_v3.py", 32),
            ("v4 (layer-0 heads unrolled) chunk 32", S + "lm_gpu_v4.py", 32), ("v5 (v4 + gate|up one product) chunk 32", S + "lm_gpu_v5.py", 32),
            ("v5 chunk 64", S + "lm_gpu_v5.py", 64)]
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
def row(**r):
    out["rows"].append(r); print(r, flush=True)
for kind in ("grpo", "dpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    batch = as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]})
    cpu_idx = c.select_indices(batch)
    prompts = c.prompt_ids(batch)
    decoders = {}
    for i, (name, path, chunk) in enumerate(variants):
        m = module(path, f"variant{i}")
        if chunk is not None:
            m.MLP_CHUNK = chunk
        decoders[name] = m.GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
    for rep in range(2):
        for name, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([c.select_index(o) for o in obs])
            row(kind=kind, path=name, rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)),
                agree=float(np.mean(idx == cpu_idx)), batched_agree=float(np.mean(c.vocabulary.config_index(d.decide(prompts)) == cpu_idx)))
    for rep in range(2):
        for name, d in decoders.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(200):
                d._graph.replay()
            end.record(); torch.cuda.synchronize()
            row(kind=kind, path=f"graph_replay_gpu_time {name}", rep=rep, median_ms=start.elapsed_time(end) / 200)
    c.gpu_decoder = None
# the stamped v3 kernel's time line (GRPO)
c = load_controller("results/m3_controllers/grpo")
d = module(S + "lm_gpu_v5_stamp.py", "stamped").GPUDecoder(c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
prompts = [prompt_ids_one(o, c.buckets, c.vocabulary) for o in obs]
t_end = time.perf_counter() + 1.0
while time.perf_counter() < t_end:
    d.decide(prompts[0])
rows = []
for p in prompts:
    d.decide(p); rows.append(d.packed.stamps.cpu().numpy()[:52].reshape(26, 2))
rel = np.stack(rows) - np.stack(rows)[:, :1]
out["stamps_v5"] = {"labels": ["start", "-", "emb", "l0 head0", "l0 head1", "l0 head2", "l0 head3", "l0 mlp", "l1 attn done",
                               "l1 h0 qk", "l1 h0 softmax", "l1 h0 out", "l1 h1 qk", "l1 h1 softmax", "l1 h1 out",
                               "l1 h2 qk", "l1 h2 softmax", "l1 h2 out", "l1 h3 qk", "l1 h3 softmax", "l1 h3 out", "l1 mlp",
                               "-", "picks done", "stored", "l0 attn done"],
                    "median_ns_from_start": np.median(rel[:, :, 1], 0).tolist(),
                    "median_cycles_from_start": np.median(rel[:, :, 0], 0).tolist()}
print(json.dumps(out["stamps_v5"]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
