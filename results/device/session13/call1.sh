# Session 13, call 1 (one H200): a kernel profile of vision + prefill; then the prefill tile for > 96 pairs
# per expert (top_k 8 at >= ~7 crops) in the whole model's prefill, variants c0 (shipped) .. c5, two rounds.
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/pt; mkdir -p $P
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > $W/nvidia_smi.txt 2>&1
timeout 120 python3 .devscratch/s13/profile_prefill.py $W/profile_prefill_h200.json > $W/profile_prefill.log 2>&1
echo "profile rc $? at $((SECONDS - T0)) s"; cat $W/profile_prefill.log | grep -v Warning | head -100
export OMP_NUM_THREADS=4
for v in c0 c1 c2 c3 c4 c5 c0r c1r c2r c3r; do
  [ $((SECONDS - T0)) -gt 520 ] && break
  timeout 70 python3 .devscratch/s13/prefill_tiles.py $v stages --preset molmoe-1b --weights random --device cuda \
    --crops 6 9 12 --top-k 4 8 --active-blocks 16 --repeats 5 --output-tokens 2 --out $P/$v --no-progress > $W/$v.log 2>&1
  echo "$v rc $? at $((SECONDS - T0)) s"
  python3 -m flexvlm_env.profiles.cli consolidate $W/$v.parquet $P/$v > /dev/null 2>&1
done
python3 - <<'PY'
import pandas as pd, os, glob
W=os.environ["OUT"]+"/w"
rows=[]
for p in sorted(glob.glob(f"{W}/c*.parquet")):
    t=pd.read_parquet(p); t["variant"]=os.path.basename(p)[:-8]; rows.append(t)
t=pd.concat(rows)
m=t.groupby(["top_k","input_tokens","variant"]).prefill_ms.median().unstack()
print(m.round(3).to_string()); m.round(4).to_csv(f"{W}/prefill_by_variant.csv")
PY
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
