# Session 13, call 3 (one H200): the working tree (fused quick_gelu, uint8 sort keys, 128x128 H200 prefill
# tile, fused prefill q/k norm + RoPE + KV) against session 12's engine and without the prefill fusion in the whole model's stage timings, twice each; GPU tests of the
# touched code; the request's kernel profile again; a host profile of `prepare`.
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/ab; mkdir -p $P
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 15 $W/gpu_tests.log
export OMP_NUM_THREADS=4
for v in base1 new1 nofp1 base2 new2 nofp2; do
  timeout 80 python3 .devscratch/s13/ab.py $v stages --preset molmoe-1b --weights random --device cuda \
    --crops 1 4 12 --top-k 1 8 --active-blocks 16 --repeats 5 --output-tokens 2 --out $P/$v --no-progress > $W/$v.log 2>&1
  echo "$v rc $? at $((SECONDS - T0)) s"
  python3 -m flexvlm_env.profiles.cli consolidate $W/$v.parquet $P/$v > /dev/null 2>&1
done
python3 - <<'PY'
import pandas as pd, os, glob
W=os.environ["OUT"]+"/w"
rows=[]
for p in sorted(glob.glob(f"{W}/base*.parquet")+glob.glob(f"{W}/new*.parquet")+glob.glob(f"{W}/nofp*.parquet")):
    t=pd.read_parquet(p); t["variant"]=os.path.basename(p)[:-8]; rows.append(t)
t=pd.concat(rows)
for col in ("preprocess_ms","vision_encoder_ms","prefill_ms","total_ms"):
    m=t.groupby(["crops","top_k","variant"])[col].median().unstack()
    print(col); print(m.round(3).to_string()); m.round(4).to_csv(f"{W}/ab_{col}.csv")
PY
unset OMP_NUM_THREADS
timeout 90 python3 .devscratch/s13/profile_prefill.py $W/profile_prefill_new_h200.json > $W/profile_prefill_new.log 2>&1
echo "profile rc $? at $((SECONDS - T0)) s"; grep -v -i warn $W/profile_prefill_new.log | head -40
timeout 60 python3 .devscratch/s13/prep_profile.py > $W/prep_profile.log 2>&1
echo "prep rc $? at $((SECONDS - T0)) s"; head -4 $W/prep_profile.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
