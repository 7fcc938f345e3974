# Session 9, call 3 (one H200): decode_gemv with 1/RMS applied to the sums, H200 MoE tile table, greedy
# token kernel. GPU tests; GEMV tile sweep; bench + profile with the shipped defaults and with the
# sweep's GEMV picks; bench_moe_kernels with the H200 tiles.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; tail -n 3 $W/gpu_tests_h200.log
BENCH="--preset molmoe-1b --weights random --grid full --crops 12 --top-k 1,2,4,8 --active-blocks 8,16"
timeout 60 python3 scripts/bench_runtime.py $BENCH --out $W/bench_default_h200.json > $W/bench_default.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep decode/token $W/bench_default.log | cut -c1-140
timeout 150 python3 .devscratch/gemv_sweep.py $W/gemv_sweep_h200.json > $W/gemv_sweep.log 2>&1
echo "sweep done at $((SECONDS - T0)) s"
timeout 60 python3 .devscratch/tuned_bench.py $W/gemv_sweep_h200.json $W/choice.json scripts/bench_runtime.py $BENCH --out $W/bench_tuned_h200.json > $W/bench_tuned.log 2>&1
echo "tuned bench done at $((SECONDS - T0)) s"; grep -E "decode/token|6144" $W/bench_tuned.log | cut -c1-140
timeout 40 python3 scripts/profile_decode.py --out $W/profile_default_h200.json > $W/profile_default.log 2>&1
timeout 60 python3 scripts/bench_moe_kernels.py --out $W/bench_moe_kernels_h200.json > $W/moe.log 2>&1
echo "profile+moe done at $((SECONDS - T0)) s"
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
