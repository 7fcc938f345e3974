"""Session 14: decode ms/token of the engine on PYTHONPATH, per mode (FLEXVLM_QK_IN_ATTENTION=1/0), in one
process (one model; graphs recaptured per mode), plus a kernel timeline of the graphed decode.

python dec_ab.py OUTDIR TAG ROUNDS MODE[,MODE...] TIMELINE(0/1)
"""
import json, os, sys
import numpy as np, torch
from PIL import Image
from flexvlm_env import Config, load_model
from flexvlm_env.model.generate import CudaGraphs

out, tag, rounds, MODES, do_timeline = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5] == "1"
os.makedirs(out, exist_ok=True)
CONFIGS = [(12, 1, 16), (12, 8, 16), (12, 2, 16), (12, 4, 16), (12, 8, 8), (12, 1, 8)]
vlm = load_model("molmoe-1b", weights="random", device="cuda")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
prompt = "What is the color of the large circle in the picture? Answer briefly."

def set_mode(mode):
    os.environ["FLEXVLM_QK_IN_ATTENTION"] = "0" if mode == "qk0" else "1"
    torch.cuda.synchronize()
    vlm._graphs = CudaGraphs(vlm.module, vlm._cache, fused_decode=vlm.fused_decode)
    torch.cuda.empty_cache()

rows = []; tokens = {}
vlm.generate(image, prompt, Config(12, 8, 16), max_new_tokens=4, ignore_eos=True)
for r in range(rounds):
    for mode in (MODES if r % 2 == 0 else MODES[::-1]):
        set_mode(mode)
        for c in CONFIGS:
            cfg = Config(crops=c[0], top_k=c[1], active_blocks=c[2])
            vlm.generate(image, prompt, cfg, max_new_tokens=64, ignore_eos=True)
            per = []
            for _ in range(5):
                res = vlm.generate(image, prompt, cfg, max_new_tokens=64, ignore_eos=True)
                per.append(float(np.mean(res.latency.decode_ms_per_token)))
            tokens.setdefault(c, {})[mode] = res.token_ids
            rows.append(dict(engine=tag, round=r, mode=mode, crops=c[0], top_k=c[1], blocks=c[2], decode_ms_per_token=float(np.median(per)),
                             runs=per))
            print(f"r{r} {mode:14s} {c} {np.median(per):.4f} ms/token", flush=True)
same = {str(c): all(v == t[MODES[0]] for v in t.values()) for c, t in tokens.items()}
print("tokens identical across modes:", same)

# Kernel timeline of the graphed decode: per kernel name, how far it advances the frontier of finished work.
from torch.profiler import ProfilerActivity, profile
timeline = {}
for mode in (MODES[:1] if do_timeline else []):
    set_mode(mode)
    for c in [(12, 1, 16), (12, 8, 16)]:
        cfg = Config(crops=c[0], top_k=c[1], active_blocks=c[2])
        vlm.generate(image, prompt, cfg, max_new_tokens=16, ignore_eos=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            vlm.generate(image, prompt, cfg, max_new_tokens=16, ignore_eos=True)
            torch.cuda.synchronize()
        ev = sorted([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA], key=lambda x: x[0])
        # the decode steps: from the first _embed_token_kernel on
        first = next((i for i, e in enumerate(ev) if "embed_token" in e[2]), None)
        if first is None:
            print("no decode kernels in the trace", mode, c, len(ev)); continue
        dec = ev[first:]
        n_steps = sum("greedy_token" in e[2] for e in dec)
        frontier = dec[0][0]; adv = {"(idle)": 0.0}; dur = {}; cnt = {}
        for s, e, name in dec:
            key = name[:60]
            if s > frontier:
                adv["(idle)"] += s - frontier
                adv[key] = adv.get(key, 0) + (e - s)
            else:
                adv[key] = adv.get(key, 0) + max(0.0, e - frontier)
            dur[key] = dur.get(key, 0) + (e - s); cnt[key] = cnt.get(key, 0) + 1
            frontier = max(frontier, e)
        span = dec[-1][1] - dec[0][0]
        timeline[f"{mode}|{c}"] = dict(steps=n_steps, span_us=span, us_per_step=span / max(n_steps, 1),
                                       advance_us_per_step={k: v / n_steps for k, v in sorted(adv.items(), key=lambda x: -x[1])},
                                       busy_us_per_step={k: v / n_steps for k, v in dur.items()},
                                       calls_per_step={k: v / n_steps for k, v in cnt.items()})
        # one step's raw sequence (relative us), for the record
        g = [i for i, e in enumerate(dec) if "greedy_token" in e[2]]
        if len(g) >= 3:
            a, b = g[-3] + 1, g[-2] + 1
            t0 = dec[a][0]
            timeline[f"{mode}|{c}"]["one_step"] = [(round(s - t0, 2), round(e - t0, 2), n[:40]) for s, e, n in dec[a:b]]
        print(mode, c, f"{span / max(n_steps, 1):.1f} us/step", {k: round(v / n_steps, 1) for k, v in list(sorted(adv.items(), key=lambda x: -x[1]))[:9]}, flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, engine=tag, rows=rows, tokens={str(c): t for c, t in tokens.items()}, tokens_identical=same, timeline=timeline),
          open(f"{out}/dec_ab_{tag}.json", "w"), indent=1)
import pandas as pd
t = pd.DataFrame(rows)
print(t.groupby(["top_k", "blocks", "mode"]).decode_ms_per_token.median().unstack().round(4).to_string())
