# Session 10, call 4 (one H200): call 3's q/k-norm-inside-attention reverted (slower). GPU tests; the
# output-projection tile A/B (2/2048/2 from call 2's PDL sweep against 2/1024/4), the faster kept; then
# the final measurements: decode A/B with and without PDL, full-grid bench + HF, profile, micro bench.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
if ! grep -q " passed" $W/gpu_tests_h200.log || grep -q "failed" $W/gpu_tests_h200.log; then tar czf $OUT/w.tgz -C $OUT w; exit 1; fi
SWEEP="--preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16"
timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/bench_tile_2_2048_2.json > $W/bench_tile_2_2048_2.log 2>&1
sed -i 's/(2048, 2048, False): GemvConfig(block_n=2, block_k=2048, num_warps=2)/(2048, 2048, False): GemvConfig(block_n=2, block_k=1024, num_warps=4)/' flexvlm_env/model/decode_gemv.py
grep -n "(2048, 2048, False)" flexvlm_env/model/decode_gemv.py
timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/bench_tile_2_1024_4.json > $W/bench_tile_2_1024_4.log 2>&1
echo "tile A/B done at $((SECONDS - T0)) s"; grep -h "crops=12" $W/bench_tile_*.log | cut -c1-175
python3 - $W > $W/tile_choice.txt <<'PY'
import json, sys
t = {}
for name in ("2_2048_2", "2_1024_4"):
    rows = json.load(open(f"{sys.argv[1]}/bench_tile_{name}.json"))["rows"]
    t[name] = sum(r["decode_ms_per_token"] for r in rows if r["active_blocks"] == 16)
print(min(t, key=t.get), t)
PY
cat $W/tile_choice.txt
if grep -q "^2_2048_2" $W/tile_choice.txt; then sed -i 's/(2048, 2048, False): GemvConfig(block_n=2, block_k=1024, num_warps=4)/(2048, 2048, False): GemvConfig(block_n=2, block_k=2048, num_warps=2)/' flexvlm_env/model/decode_gemv.py; fi
grep -n "(2048, 2048, False)" flexvlm_env/model/decode_gemv.py | tee $W/tile_used.txt
FLEXVLM_PDL=0 timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/bench_sweep_pdl0.json > $W/bench_sweep_pdl0.log 2>&1
echo "no-PDL sweep done at $((SECONDS - T0)) s"; grep -E "crops=12" $W/bench_sweep_pdl0.log | cut -c1-175
timeout 230 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans.*grouped" $W/bench.log | cut -c1-175
timeout 40 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"; grep -E "us of kernels" $W/profile.log
( export OMP_NUM_THREADS=4; timeout 45 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json ) > $W/bench_micro.log 2>&1
echo "micro done at $((SECONDS - T0)) s"; tail -n 1 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
