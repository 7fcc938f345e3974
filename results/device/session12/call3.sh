# Session 12, call 3 (one H200): the prefill tile table's 16-row bound in the whole model's prefill
# (stage-table points at 16 blocks, top_k 1/2/4, 384-1344 tokens), variants b16 (shipped), b8, b4, b0,
# then b16 again.
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/pb; mkdir -p $P
export OMP_NUM_THREADS=4
for v in b16 b8 b4 b0 b16r; do
  timeout 150 python3 .devscratch/s12/prefill_bound.py $v stages --preset molmoe-1b --weights random --device cuda \
    --crops 1 2 3 4 9 12 --top-k 1 2 4 --active-blocks 16 --repeats 5 --output-tokens 2 --out $P/$v --no-progress > $W/$v.log 2>&1
  echo "$v rc $? at $((SECONDS - T0)) s"
  python3 -m flexvlm_env.profiles.cli consolidate $W/$v.parquet $P/$v > /dev/null 2>&1
done
python3 - <<'PY'
import pandas as pd, os
W=os.environ["OUT"]+"/w"
rows=[]
for v in ("b16","b8","b4","b0","b16r"):
    p=f"{W}/{v}.parquet"
    if os.path.exists(p):
        t=pd.read_parquet(p); t["variant"]=v; rows.append(t)
t=pd.concat(rows)
print(t.groupby(["top_k","input_tokens","variant"]).prefill_ms.median().unstack().round(3).to_string())
PY
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
