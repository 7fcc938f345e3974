"""Run a script (bench_runtime / profile_decode) with the decode_gemv tiles picked from the sweep JSON."""
import json, runpy, sys
import flexvlm_env.model.decode_gemv as dg
sweep = json.load(open(sys.argv[1])); choice_path = sys.argv[2]; script = sys.argv[3]
rows = [r for r in sweep["gemv"] if r["method"] == "triton"]
for n, fused in ((6144, True), (2048, False)):
    best = min((r for r in rows if r["n"] == n and r["fused"] == fused), key=lambda r: r["us"])
    dg.DEFAULT_CONFIGS[(n, 2048, fused)] = dg.GemvConfig(best["block_n"], best["block_k"], best["num_warps"])
choice = {str(k): vars(v) for k, v in dg.DEFAULT_CONFIGS.items()}
open(choice_path, "w").write(json.dumps(choice, indent=1)); print(choice, flush=True)
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
