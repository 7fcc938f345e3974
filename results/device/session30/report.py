"""Print each kept run's held-out reward curve, its final reward / retention / violations, retention by budget
fraction, and (when knob_choices.json is there) the share of requests given 9 or 12 crops at each fraction."""
import glob, json, os, sys
for d in sorted(glob.glob(os.path.join(sys.argv[1], "*"))):
    if not os.path.isdir(d):
        continue
    name = os.path.basename(d)
    try:
        lines = [json.loads(l) for l in open(f"{d}/curves.jsonl")]
    except FileNotFoundError:
        print(name, "no curves"); continue
    print(f"{name:16s} " + " ".join(f"{l['env_steps']}:{l['eval/reward']:.3f}" for l in lines))
    if os.path.exists(f"{d}/final.json"):
        final = json.load(open(f"{d}/final.json"))
        (r,) = final["results"].values()
        print("    final reward %.4f retention %.4f violations %.4f, %d env steps, %.0f s" % (
            r["mean"]["reward"], r["mean"]["quality_retention"], r["mean"]["violation_rate"], final["env_steps"],
            final["wall_clock_s"]))
        print("    retention by fraction:", " ".join(f"{k}:{v['quality_retention']:.3f}" for k, v in r["by_fraction"].items()))
    if os.path.exists(f"{d}/knob_choices.json"):
        (c,) = json.load(open(f"{d}/knob_choices.json"))["controllers"].values()
        print("    9 or 12 crops:", " ".join(f"{k}:{v['crops']['9'] + v['crops']['12']:.2f}" for k, v in c.items()))
