# Session 14, call 4 (one H200): the working tree = HEAD + the q/k norms, RoPE and KV write inside the attention's
# split programs (the neutral-split change of call 3 dropped). GPU tests; HEAD's engine (old) against the working
# tree (new), alternated twice, with a kernel timeline each; then on the working tree the full runtime grid + HF
# and the micro benchmark.
T0=$SECONDS; W=$OUT/w; mkdir -p $W /tmp/old
git archive HEAD flexvlm_env | tar -x -C /tmp/old; git log -1 --format=%h > $W/head.txt
timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 6 $W/gpu_tests.log
for rep in 1 2; do
  PYTHONPATH=/tmp/site:/tmp/old timeout 60 python3 .devscratch/s14/dec_ab.py $W old$rep 1 qk1 $((rep == 1)) > $W/old$rep.log 2>&1; echo "old$rep rc $? at $((SECONDS - T0)) s"
  timeout 60 python3 .devscratch/s14/dec_ab.py $W new$rep 1 qk1 $((rep == 1)) > $W/new$rep.log 2>&1; echo "new$rep rc $? at $((SECONDS - T0)) s"
done
python3 - <<'PY'
import json, glob, os, pandas as pd
W = os.environ["OUT"] + "/w"
rows = [r for f in sorted(glob.glob(f"{W}/dec_ab_*.json")) for r in json.load(open(f))["rows"]]
t = pd.DataFrame(rows); t["variant"] = t.engine.str[:3]
m = t.groupby(["top_k", "blocks", "variant"]).decode_ms_per_token.median().unstack()
print(m.round(4).to_string()); m.round(5).to_csv(f"{W}/dec_ab_medians.csv")
for v in m.columns: print(v, "width ratio", round(m.loc[(1, 16), v] / m.loc[(8, 16), v], 4), "depth", round(m.loc[(8, 8), v] / m.loc[(8, 16), v], 4))
PY
grep -E "us/step" $W/new1.log | cut -c1-300
timeout 220 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench rc $? at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans.*grouped" $W/bench.log | cut -c1-175
timeout 45 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json > $W/bench_micro.log 2>&1
echo "micro bench rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
