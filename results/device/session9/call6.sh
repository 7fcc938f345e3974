# Session 9, call 6 (one H200): decode-attention warps x chunk sweep; the runtime (full grid, HF
# baseline), profile and GPU tests with the sweep's best (chunk, warps) for MolmoE-1B at 1280 keys.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
timeout 90 python3 scripts/bench_decode_attention.py --chunks 128 64 32 --num-warps 2 4 8 --out $W/bench_decode_attention_h200.json > $W/attn.log 2>&1
echo "attn sweep done at $((SECONDS - T0)) s"; cat $W/attn.log | grep -v "^wrote"
python3 - $W/bench_decode_attention_h200.json > $W/attn_choice.txt <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["preset"] == "molmoe-1b" and r["visible_keys"] == 1280]
best = min(rows, key=lambda r: r["us_per_call"]); default = next(r for r in rows if r["default"])
print(best["chunk"], best["num_warps"], best["us_per_call"], default["us_per_call"])
PY
cat $W/attn_choice.txt; read CHUNK WARPS BEST DEF < $W/attn_choice.txt
sed -i "s/^DEFAULT_CHUNK = .*/DEFAULT_CHUNK = $CHUNK/; s/^DEFAULT_WARPS = .*/DEFAULT_WARPS = $WARPS  # warps per split program/" flexvlm_env/model/decode_attention.py
grep -n "^DEFAULT_CHUNK\|^DEFAULT_WARPS" flexvlm_env/model/decode_attention.py | tee $W/attn_defaults_used.txt
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; tail -n 2 $W/gpu_tests_h200.log
timeout 150 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans" $W/bench.log | cut -c1-150
timeout 30 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
( export OMP_NUM_THREADS=4; timeout 30 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json ) > $W/bench_micro.log 2>&1
echo "all done at $((SECONDS - T0)) s"; tail -n 1 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
