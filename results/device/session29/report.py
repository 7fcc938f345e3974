"""Print each kept run's reward curve and final retention / violations by budget fraction."""
import glob, json, os, sys
for d in sorted(glob.glob(os.path.join(sys.argv[1], "*"))):
    if not os.path.isdir(d):
        continue
    name = os.path.basename(d)
    try:
        lines = [json.loads(l) for l in open(f"{d}/curves.jsonl")]
    except FileNotFoundError:
        print(name, "no curves"); continue
    print(f"{name:22s} " + " ".join(f"{l['env_steps']}:{l['eval/reward']:.3f}" for l in lines))
    if os.path.exists(f"{d}/final.json"):
        r = json.load(open(f"{d}/final.json"))["results"]["grpo"]
        print("    final reward %.4f retention %.4f violations %.4f" % (r["mean"]["reward"], r["mean"]["quality_retention"], r["mean"]["violation_rate"]))
        print("    retention by fraction:", " ".join(f"{k}:{v['quality_retention']:.3f}" for k, v in r["by_fraction"].items()))
