# Session 13, call 5 (one H200): the ViT's residual add + LayerNorm as one kernel. GPU tests; the working
# tree (new) against commit 43dd748's engine (cur) in the stage timings, twice each; then, measured on the
# working tree, the molmoe-1b stage table + validation, the full runtime grid + HF, the micro benchmark.
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/ab2; mkdir -p $P
timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 4 $W/gpu_tests.log
export OMP_NUM_THREADS=4
for v in cur1 new1 cur2 new2; do
  timeout 60 python3 .devscratch/s13/ab2.py $v stages --preset molmoe-1b --weights random --device cuda \
    --crops 1 4 12 --top-k 8 --active-blocks 16 --repeats 5 --output-tokens 2 --out $P/$v --no-progress > $W/$v.log 2>&1
  echo "$v rc $? at $((SECONDS - T0)) s"
  python3 -m flexvlm_env.profiles.cli consolidate $W/$v.parquet $P/$v > /dev/null 2>&1
done
python3 - <<'PY'
import pandas as pd, os, glob
W=os.environ["OUT"]+"/w"
t=pd.concat([pd.read_parquet(p).assign(variant=os.path.basename(p)[:-8]) for p in sorted(glob.glob(f"{W}/cur*.parquet")+glob.glob(f"{W}/new*.parquet"))])
for col in ("vision_encoder_ms","prefill_ms"):
    m=t.groupby(["crops","variant"])[col].median().unstack(); print(col); print(m.round(3).to_string()); m.round(4).to_csv(f"{W}/ab2_{col}.csv")
PY
cli="python3 -m flexvlm_env.profiles.cli"
timeout 150 $cli stages --preset molmoe-1b --weights random --device cuda --out $P/molmoe-1b_h200_stages --no-progress > $W/stages.log 2>&1
echo "stages rc $? at $((SECONDS - T0)) s"
$cli consolidate $W/molmoe-1b_h200_stages.parquet $P/molmoe-1b_h200_stages > /dev/null 2>&1
timeout 90 $cli validate-stages --preset molmoe-1b --weights random --device cuda --stages $P/molmoe-1b_h200_stages --json-out $W/replay_latency_validation_molmoe-1b_h200.json --no-progress > $W/validate.log 2>&1
echo "validate rc $? at $((SECONDS - T0)) s"; tail -n 5 $W/validate.log
unset OMP_NUM_THREADS
timeout 200 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench rc $? at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans.*grouped" $W/bench.log | cut -c1-175
timeout 40 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json > $W/bench_micro.log 2>&1
echo "micro bench rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
