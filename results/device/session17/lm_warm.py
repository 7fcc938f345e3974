"""Session 17: does a batch-1 decision's time depend on how long the GPU (and host) have been busy? GRPO's GPU
decision and FlexVLM's (CPU) decision in bursts after 3 s idle, every call timed with its start time; graph replay
+ synchronize alone likewise; GPU clocks sampled by nvidia-smi beside it (clocks.csv). Then the kernel's own
time line from clock64/globaltimer stamps (.devscratch/s17/lm_gpu_stamp.py). Usage: lm_warm.py OUT_DIR"""
import importlib.util, json, subprocess, sys, time
import numpy as np, torch
from agents.base import load_controller
from agents.lm import PROMPT_LENGTH
from flexvlm_env.benchmarking import device_info
from flexvlm_env.experiments import overhead as m3
out_dir = sys.argv[1]
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,pstate,power.draw,utilization.gpu",
                        "--format=csv,noheader", "-lms", "20"], stdout=open(f"{out_dir}/clocks.csv", "w"))
torch.set_num_threads(1)
obs = m3.replay_observations("molmoe-1b-h100", 500, 0)
grpo = load_controller("results/m3_controllers/grpo").use_device("cuda")
flex = load_controller("results/e4_controllers/molmoe-1b-h100/flexvlm")
for o in obs[:20]:
    grpo.select_config(o)
res = {"device": device_info(torch.device("cuda")), "t0_unix": time.time(), "bursts": []}
def burst(name, fn, n):
    time.sleep(3.0)
    starts, times = np.empty(n), np.empty(n)
    t_begin = time.perf_counter_ns()
    for i in range(n):
        o = obs[i % len(obs)]
        a = time.perf_counter_ns(); fn(o); b = time.perf_counter_ns()
        starts[i], times[i] = (a - t_begin) / 1e6, (b - a) / 1e6
    unix = time.time()
    # medians by window of 250 calls: does the time fall as the burst goes on?
    windows = [float(np.median(times[i:i + 250])) for i in range(0, n, 250)]
    r = {"name": name, "n": n, "end_unix": unix, "duration_ms": float(starts[-1] + times[-1]),
         "median_by_250": windows, "median_first_500": float(np.median(times[:500])), "median_last_500": float(np.median(times[-500:]))}
    res["bursts"].append(r); print(r, flush=True)
g = grpo.gpu_decoder
def replay(o):
    g._graph.replay(); torch.cuda.current_stream().synchronize()
for rep in range(2):
    burst("grpo select_config", grpo.select_config, 6000)
    burst("graph replay + synchronize", replay, 6000)
    burst("flexvlm (CPU) select_config", flex.select_config, 6000)
    burst("grpo prompt_ids_one only", lambda o: __import__("agents.lm", fromlist=["x"]).prompt_ids_one(o, grpo.buckets, grpo.vocabulary), 6000)
# a busy GPU (a 20 ms matmul loop in another stream) while deciding: like a served model between requests
x = torch.randn(8192, 8192, device="cuda"); s2 = torch.cuda.Stream()
with torch.cuda.stream(s2):
    for _ in range(400): x @ x
burst("grpo select_config while another stream runs matmuls", grpo.select_config, 3000)
torch.cuda.synchronize()
# the kernel's time line
spec = importlib.util.spec_from_file_location("lm_gpu_stamp", ".devscratch/s17/lm_gpu_stamp.py")
stamp = importlib.util.module_from_spec(spec); spec.loader.exec_module(stamp)
d = stamp.GPUDecoder(grpo.model, grpo.vocabulary.knob_ids, PROMPT_LENGTH, "cuda")
from agents.lm import prompt_ids_one
prompts = [prompt_ids_one(o, grpo.buckets, grpo.vocabulary) for o in obs]
for p in prompts[:50]: d.decide(p)
t_end = time.perf_counter() + 1.0
while time.perf_counter() < t_end: d.decide(prompts[0])
rows = []
for p in prompts:
    d.decide(p); rows.append(d.packed.stamps.cpu().numpy()[:50].reshape(25, 2))
rows = np.stack(rows)  # [n, 25, (clock, globaltimer)]
rel = rows - rows[:, :1]
res["stamps"] = {"labels": ["start", "ids read", "emb/cos/sin", "l0 head0", "l0 head1", "l0 head2", "l0 head3", "l0 mlp",
                            "l1 rms", "l1 h0 qk", "l1 h0 softmax", "l1 h0 out", "l1 h1 qk", "l1 h1 softmax", "l1 h1 out",
                            "l1 h2 qk", "l1 h2 softmax", "l1 h2 out", "l1 h3 qk", "l1 h3 softmax", "l1 h3 out", "l1 mlp",
                            "pick crops", "picks done", "stored"],
                 "median_cycles_from_start": np.median(rel[:, :, 0], 0).tolist(),
                 "median_ns_from_start": np.median(rel[:, :, 1], 0).tolist()}
print(json.dumps(res["stamps"]), flush=True)
smi.terminate()
json.dump(res, open(f"{out_dir}/lm_warm_h200.json", "w"), indent=1)
