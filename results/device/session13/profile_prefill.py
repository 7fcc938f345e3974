"""Session 13: device time per kernel of one request's vision + prefill (+ 1 decode step), PyTorch profiler."""
import json, sys
import numpy as np, torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from flexvlm_env import Config, load_model

vlm = load_model("molmoe-1b", weights="random", device="cuda")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
prompt = "What is the color of the large circle in the picture? Answer briefly."
out = {}
for crops, top_k in ((12, 8), (12, 1), (4, 8)):
    cfg = Config(crops=crops, top_k=top_k, active_blocks=16)
    for _ in range(3):
        vlm.generate(image, prompt, cfg, max_new_tokens=1, ignore_eos=True)
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            r = vlm.generate(image, prompt, cfg, max_new_tokens=1, ignore_eos=True)
        torch.cuda.synchronize()
    tot = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = tot.setdefault(e.name[:100], [0, 0.0]); t[0] += 1; t[1] += e.time_range.elapsed_us()
    rows = sorted(({"kernel": k, "calls": c / n, "us": u / n} for k, (c, u) in tot.items()), key=lambda x: -x["us"])
    total = sum(x["us"] for x in rows)
    print(f"\ncrops={crops} top_k={top_k} tokens={r.tokens.input}: {total/1e3:.2f} ms of kernels per request, latency {r.latency}")
    for x in rows[:25]:
        print(f"  {x['us']:9.1f} us {x['calls']:6.1f}x  {x['kernel']}")
    out[f"{crops},{top_k}"] = {"tokens": r.tokens.input, "kernel_us": total, "rows": rows[:60]}
json.dump(out, open(sys.argv[1], "w"), indent=1)
