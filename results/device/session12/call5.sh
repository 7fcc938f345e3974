# Session 12, call 5 (one H200): the micro model with the H200 prefill tiles of commit eedc8f2. micro's
# prefill at stage-table points (crops 1/4/12, top_k 1/2/8, 16 blocks) with the 16-row bound at 16
# (session 11) and 0 (now), then the micro request benchmark (results/bench_micro_h200.json).
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/pbm; mkdir -p $P
nvidia-smi > $W/nvidia_smi.txt 2>&1
export OMP_NUM_THREADS=4
for v in b16 b0 b16r b0r; do
  timeout 100 python3 .devscratch/s12/prefill_bound.py $v stages --preset micro --device cuda \
    --crops 1 4 12 --top-k 1 2 8 --active-blocks 16 --repeats 5 --output-tokens 2 --out $P/$v --no-progress > $W/micro_$v.log 2>&1
  echo "$v rc $? at $((SECONDS - T0)) s"
  python3 -m flexvlm_env.profiles.cli consolidate $W/micro_$v.parquet $P/$v > /dev/null 2>&1
done
python3 - <<'PY'
import pandas as pd, os
W=os.environ["OUT"]+"/w"
t=pd.concat([pd.read_parquet(f"{W}/micro_{v}.parquet").assign(variant=v) for v in ("b16","b0","b16r","b0r") if os.path.exists(f"{W}/micro_{v}.parquet")])
print(t.groupby(["top_k","input_tokens","variant"]).prefill_ms.median().unstack().round(3).to_string())
PY
timeout 60 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json > $W/bench_micro.log 2>&1
echo "micro bench rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
