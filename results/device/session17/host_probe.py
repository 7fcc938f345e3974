"""Session 17, call 7: is the H200 host's CPU-side slowness tied to the CPU the process runs on? Every ~50 ms
for DURATION s: the median of 50 FlexVLM (CPU) decisions, with the CPU the process last ran on (/proc/self/stat).
Usage: host_probe.py OUT_JSON DURATION_S"""
import json, sys, time
import numpy as np, torch
from agents.base import load_controller
from agents.evaluation import time_calls_ms
from flexvlm_env.experiments import overhead as m3
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 50, 0)
flex = load_controller("results/e4_controllers/molmoe-1b-h100/flexvlm")
time_calls_ms(flex.select_config, obs)
rows, t0 = [], time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[2]):
    cpu = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[36])  # field 39: processor
    t = time_calls_ms(flex.select_config, obs, warmup=0)
    rows.append((round(time.perf_counter() - t0, 3), cpu, float(np.median(t) * 1000)))
    time.sleep(0.05)
by_cpu = {}
for _, cpu, us in rows:
    by_cpu.setdefault(cpu, []).append(us)
summary = {str(c): {"n": len(v), "median_us": float(np.median(v)), "min_us": float(min(v)), "max_us": float(max(v))} for c, v in sorted(by_cpu.items())}
print(json.dumps(summary))
json.dump({"rows": rows, "by_cpu": summary}, open(sys.argv[1], "w"))
