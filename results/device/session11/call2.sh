# Session 11, call 2 (one H200; call 1 fixed: the test ran graphs.decode outside inference mode, the tile sweep ran out of time): attention combine inside the split kernel (per-head arrival counters),
# ln_f + LM head as one PDL decode_gemv, self-advancing decode graph (greedy writes token/slot/history).
# GPU tests; GEMV sweep incl. the LM head (tile chosen here); decode sweep new vs old (6ba11ed) x2; profile.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
timeout 150 python3 scripts/bench_decode_kernels.py --sections gemv --gemv-shapes head --block-n 4 8 16 32 --block-k 512 1024 2048 --num-warps 4 8 --out $W/bench_decode_kernels_gemv_h200.json > $W/kernels.log 2>&1
echo "gemv sweep done at $((SECONDS - T0)) s"; cat $W/kernels.log | tail -n 5
python3 - $W > $W/head_tile.txt <<'PY'
import json, sys
rows = json.load(open(f"{sys.argv[1]}/bench_decode_kernels_gemv_h200.json"))["rows"]
head = [r for r in rows if r.get("n") == 50304]
base = next(r for r in head if r["method"] != "decode_gemv")
best = min((r for r in head if r["method"] == "decode_gemv"), key=lambda r: r["us"])
print(best["block_n"], best["block_k"], best["num_warps"], f"{best['us']:.2f} us vs {base['method']} {base['us']:.2f} us")
PY
cat $W/head_tile.txt
read BN BK NW REST < $W/head_tile.txt
[ -n "$BN" ] && sed -i "s/(50304, 2048, True): GemvConfig(block_n=16, block_k=512, num_warps=4)/(50304, 2048, True): GemvConfig(block_n=$BN, block_k=$BK, num_warps=$NW)/" flexvlm_env/model/decode_gemv.py
grep -n "(50304, 2048, True)" flexvlm_env/model/decode_gemv.py | tee $W/head_tile_used.txt
mkdir -p /tmp/old && cp -r flexvlm_env /tmp/old/ && cp .devscratch/s11/old/flexvlm_env/model/*.py /tmp/old/flexvlm_env/model/
SWEEP="--preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16"
for rep in 1 2; do
  timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_new_$rep.json > $W/sweep_new_$rep.log 2>&1
  PYTHONPATH=/tmp/site:/tmp/old timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_old_$rep.json > $W/sweep_old_$rep.log 2>&1
done
echo "sweeps done at $((SECONDS - T0)) s"
for f in $W/sweep_*.log; do echo "== $f"; grep -E "crops=12" $f | cut -c1-175; done
timeout 40 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"; grep -E "us of kernels" $W/profile.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
