"""Session 18: the batch-1 host path of the LM controllers' GPU decision, HEAD's (06195b3) against the working
tree's, DPO and GRPO, the same 500 observations, the variants taking turns over 10 slices (the host CPU's speed
changes within a run):
  old       HEAD's path: prompt ids from the array path's calls, decide() with its checks and a stream wait,
            the config index by array arithmetic
  new_sync  the working tree's select_config, waiting on the stream (spin_s=0)
  new       the working tree's select_config, polling the pinned answer (default spin_s)
  ids_old / ids_new      the prompt ids alone
  replay_sync / replay_spin   one graph replay and its wait alone (ids already in place)
then the GPU time of 200 back-to-back graph replays. Usage: lm_ab12.py OUT_JSON"""
import json, sys, time
import numpy as np, torch
from agents.base import as_batch, load_controller
from agents.evaluation import time_calls_ms
from agents.features import scaled_parts_one
from agents.lm import N_FAMILIES, PROMPT_LENGTH, _FEATURE_COLUMNS, prompt_ids_one
from agents import lm_gpu
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3

torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
out = {"device": device_info(torch.device("cuda")), "triton": lm_gpu.triton.__version__, "n_observations": len(obs), "rows": []}


def old_prompt_ids_one(observation, buckets, vocabulary):  # HEAD's, verbatim but for the error checks' text
    family = int(observation["family"])
    if not 0 <= family < N_FAMILIES:
        raise ValueError("family")
    fraction, budget, prompt, image = scaled_parts_one(observation)
    features = np.concatenate([[fraction, budget], prompt, image])[None]
    if not np.all(np.isfinite(features)):
        raise ValueError("finite")
    ids = np.empty((1, PROMPT_LENGTH), dtype=np.int64)
    ids[0, 0] = vocabulary.bos_id
    ids[0, 1] = vocabulary.family_ids[family]
    ids[0, 2:-1] = vocabulary.feature_ids[_FEATURE_COLUMNS, buckets.buckets(features)[0]]
    ids[0, -1] = vocabulary.answer_id
    return ids


for kind in ("grpo", "dpo"):
    c = load_controller(f"results/m3_controllers/{kind}")
    batch = as_batch({k: np.stack([np.asarray(o[k]) for o in obs]) for k in obs[0]})
    cpu_idx = c.select_indices(batch)
    args = (c.model, c.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
    spin, sync = lm_gpu.GPUDecoder(*args), lm_gpu.GPUDecoder(*args, spin_s=0)
    voc, shape = c.vocabulary, c.vocabulary.grid.shape

    def old(o):
        ids = old_prompt_ids_one(o, c.buckets, voc)
        answer = sync._decide_one(sync._check(ids))[0]
        i, j, k = voc._knob_index[answer]
        return c._configs[int((i * shape[1] + j) * shape[2] + k)]

    def new_sync(o):
        c.gpu_decoder = sync
        return c.select_config(o)

    def new(o):
        c.gpu_decoder = spin
        return c.select_config(o)

    fixed = prompt_ids_one(obs[0], c.buckets, voc)
    variants = {"old": old, "new_sync": new_sync, "new": new,
                "ids_old": lambda o: old_prompt_ids_one(o, c.buckets, voc), "ids_new": lambda o: prompt_ids_one(o, c.buckets, voc),
                "replay_sync": lambda o: sync._decide_one(fixed), "replay_spin": lambda o: spin._decide_one(fixed)}
    picks = {name: [f(o) for o in obs] for name, f in variants.items() if name in ("old", "new_sync", "new")}  # also warms up
    for f in variants.values():
        for o in obs[:20]:
            f(o)
    times = {name: [] for name in variants}
    for part in np.array_split(np.arange(len(obs)), 10):
        items = [obs[i] for i in part]
        for name, f in variants.items():
            times[name].append(time_calls_ms(f, items, warmup=0))
    configs = c._configs
    for name, t in times.items():
        t = np.concatenate(t)
        r = dict(kind=kind, variant=name, median_ms=float(np.median(t)), p95_ms=float(np.percentile(t, 95)),
                 slice_medians_ms=[float(np.median(x)) for x in times[name]])
        if name in picks:
            r["agree_numpy"] = float(np.mean([configs.index(p) == i for p, i in zip(picks[name], cpu_idx)]))
        out["rows"].append(r); print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "slice_medians_ms"}, flush=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(200):
        spin._graph.replay()
    end.record(); torch.cuda.synchronize()
    out["rows"].append(dict(kind=kind, variant="graph_replay_gpu_time", median_ms=start.elapsed_time(end) / 200))
    print(out["rows"][-1], flush=True)
    c.gpu_decoder = None
json.dump(out, open(sys.argv[1], "w"), indent=1)
