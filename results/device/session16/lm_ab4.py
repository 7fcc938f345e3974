"""Session 16, call 4: the token-tree decision kernel with IEEE float32 products (shipped) against TF32x3 products
(three TF32 tensor-core products per product, error near float32's; .devscratch/s16/lm_gpu_tf32x3.py) at 4 and 8
warps, and a leaner batch-1 host wrapper (no device context when the current device is the decoder's). Same 500
observations, alternated twice; agreement with NumPy (and NumPy's own margin where they differ); graph replay
GPU time. Usage: lm_ab4.py OUT_JSON"""
import importlib.util, json, sys
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.lm import PROMPT_LENGTH
from agents.lm_gpu import GPUDecoder
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
spec = importlib.util.spec_from_file_location("lm_gpu_tf32x3", ".devscratch/s16/lm_gpu_tf32x3.py")
tf = importlib.util.module_from_spec(spec); spec.loader.exec_module(tf)
torch.set_num_threads(1)


class Lean(tf.GPUDecoder):
    def _decide_one(self, ids):
        if self._graph is None:
            self._build_graph()
            self._index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        np.copyto(self._ids_host_np, ids)
        if torch.cuda.current_device() == self._index:
            self._graph.replay()
            torch.cuda.current_stream().synchronize()
        else:
            with torch.cuda.device(self.device):
                self._graph.replay()
                torch.cuda.current_stream().synchronize()
        return self._out_host_np.copy()


obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "n_observations": len(obs), "rows": []}
def row(**r):
    out["rows"].append(r); print(r, flush=True)
for kind in ("dpo", "grpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    batch = as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]})
    cpu_idx = c.select_indices(batch)
    prompts = c.prompt_ids(batch)
    answers = c.generate(batch)
    margins = np.empty(answers.shape)
    def choose(step, logits):
        knob = np.sort(logits[:, c.vocabulary.knob_ids[step]], axis=1)
        margins[:, step] = knob[:, -1] - knob[:, -2]
        return answers[:, step]
    c.decoder.decode(prompts, choose, 3)
    args = (c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
    decoders = {"ieee_w8": GPUDecoder(*args, num_warps=8), "tf32x3_w4": tf.GPUDecoder(*args, num_warps=4),
                "tf32x3_w4_lean": Lean(*args, num_warps=4),
                "ieee_w16": GPUDecoder(*args, num_warps=16)}
    for rep in range(2):
        for name, d in decoders.items():
            c.gpu_decoder = d
            t = time_calls_ms(c.select_config, obs)
            idx = np.array([c.select_index(o) for o in obs])
            differ = np.flatnonzero(idx != cpu_idx)
            row(kind=kind, path=name, rep=rep, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)),
                agree=float(np.mean(idx == cpu_idx)), numpy_min_margin_where_differ=float(margins[differ].min()) if len(differ) else None)
    for name, d in decoders.items():
        d.decide(prompts[:1])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for rep in range(2):
            start.record()
            for _ in range(200):
                d._graph.replay()
            end.record(); torch.cuda.synchronize()
            row(kind=kind, path=f"graph_replay_gpu_time_{name}", rep=rep, median_ms=start.elapsed_time(end) / 200)
    # batched kernel agreement over all 500 at once (one program per row)
    for name in ("ieee_w8", "tf32x3_w4"):
        got = decoders[name].decide(prompts)
        row(kind=kind, path=f"batched_{name}", agree_tokens=float(np.mean((got == answers).all(axis=1))))
    c.gpu_decoder = None
json.dump(out, open(sys.argv[1], "w"), indent=1)
