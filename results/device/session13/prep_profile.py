"""Session 13: where the host's `prepare` (image preprocessing + token layout) spends its time, 12 crops."""
import cProfile, pstats, time
import numpy as np, torch
from PIL import Image
from flexvlm_env import Config, load_model
vlm = load_model("molmoe-1b", weights="random", device="cuda")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
prompt = "What is the color of the large circle in the picture? Answer briefly."
for crops in (12, 4, 1):
    cfg = Config(crops=crops, top_k=8, active_blocks=16)
    for _ in range(5):
        vlm.generate(image, prompt, cfg, max_new_tokens=1)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        t = time.perf_counter(); vlm.prepare(image, prompt, cfg); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    lat = [vlm.generate(image, prompt, cfg, max_new_tokens=1).latency.preprocess_ms for _ in range(10)]
    print(f"crops={crops}: prepare + sync {1e3*np.median(ts):.2f} ms median; generate's preprocess_ms {np.median(lat):.2f}")
cfg = Config(crops=12, top_k=8, active_blocks=16)
pr = cProfile.Profile(); pr.enable()
for _ in range(20):
    vlm.prepare(image, prompt, cfg)
torch.cuda.synchronize(); pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
