# Session 11, call 6 (one H200): the committed code (call 5: the in-kernel attention combine reverted;
# ln_f + LM head as one PDL GEMV with tile 16/512/8, self-advancing decode graph kept). GPU tests; full grid
# + HF (results/bench_runtime_h200.json); profile; micro bench.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
timeout 260 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans.*grouped" $W/bench.log | cut -c1-175
timeout 40 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"; grep -E "us of kernels" $W/profile.log
( export OMP_NUM_THREADS=4; timeout 45 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json ) > $W/bench_micro.log 2>&1
echo "micro done at $((SECONDS - T0)) s"; tail -n 1 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
