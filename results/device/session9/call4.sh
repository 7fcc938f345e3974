# Session 9, call 4 (one H200): the final code. GPU tests; runtime benchmark (molmoe-1b, full grid, HF
# baseline); decode profile; decode-kernel tile sweeps; MoE kernel benchmark; micro request benchmark.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; tail -n 2 $W/gpu_tests_h200.log
timeout 230 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=16|hf-trans" $W/bench.log | cut -c1-150
timeout 30 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"
timeout 150 python3 scripts/bench_decode_kernels.py --out $W/bench_decode_kernels_h200.json > $W/kernels.log 2>&1
echo "kernels done at $((SECONDS - T0)) s"; cat $W/kernels.log | tail -n 14
( export OMP_NUM_THREADS=4; timeout 40 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json ) > $W/bench_micro.log 2>&1
echo "micro done at $((SECONDS - T0)) s"; tail -n 3 $W/bench_micro.log
timeout 35 python3 scripts/bench_moe_kernels.py --out $W/bench_moe_kernels_h200.json > $W/moe.log 2>&1
echo "moe done at $((SECONDS - T0)) s"
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
