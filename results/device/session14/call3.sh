# Session 14, call 3 (one H200): (a) splits past the slot end at once, the combine leaves their rows out;
# (b) the q/k norms + RoPE + KV write inside the attention's split programs (decode_attention_qk), from the q/k/v
# GEMV's partial sums of squares. GPU tests; then HEAD's engine (old) against the working tree (new, qk on / off),
# alternated twice; kernel timeline of each.
T0=$SECONDS; W=$OUT/w; mkdir -p $W /tmp/old
git archive HEAD flexvlm_env | tar -x -C /tmp/old; git log -1 --format=%h > $W/head.txt
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 6 $W/gpu_tests.log
for rep in 1 2; do
  PYTHONPATH=/tmp/site:/tmp/old timeout 100 python3 .devscratch/s14/dec_ab.py $W old$rep 1 qk1 $((rep == 1)) > $W/old$rep.log 2>&1; echo "old$rep rc $? at $((SECONDS - T0)) s"
  timeout 140 python3 .devscratch/s14/dec_ab.py $W new$rep 1 qk1,qk0 $((rep == 1)) > $W/new$rep.log 2>&1; echo "new$rep rc $? at $((SECONDS - T0)) s"
done
python3 - <<'PY'
import json, glob, os, pandas as pd
W = os.environ["OUT"] + "/w"
rows = [r for f in sorted(glob.glob(f"{W}/dec_ab_*.json")) for r in json.load(open(f))["rows"]]
t = pd.DataFrame(rows); t["variant"] = t.engine.str[:3] + "_" + t["mode"]
m = t.groupby(["top_k", "blocks", "variant"]).decode_ms_per_token.median().unstack()
print(m.round(4).to_string()); m.round(5).to_csv(f"{W}/dec_ab_medians.csv")
for v in m.columns: print(v, "width ratio", round(m.loc[(1, 16), v] / m.loc[(8, 16), v], 4), "depth", round(m.loc[(8, 8), v] / m.loc[(8, 16), v], 4))
PY
for f in $W/old1.log $W/new1.log; do grep -E "us/step|identical" $f | cut -c1-300; done
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
