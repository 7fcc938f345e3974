# Session 10, call 3 (one H200): the final code (PDL, RoPE tables, embed kernel, router with the MoE norm,
# q/k norm inside attention, down prefetch, output-projection tile). GPU tests (stop on failure); decode
# A/B with and without PDL (sweep grid); full-grid runtime bench + HF baseline; profile; micro bench.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" | tee $W/versions.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
if ! grep -q " passed" $W/gpu_tests_h200.log || grep -q "failed" $W/gpu_tests_h200.log; then tar czf $OUT/w.tgz -C $OUT w; exit 1; fi
for pdl in 1 0; do
  FLEXVLM_PDL=$pdl timeout 90 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16 --out $W/bench_sweep_pdl$pdl.json > $W/bench_sweep_pdl$pdl.log 2>&1
  echo "sweep PDL=$pdl done at $((SECONDS - T0)) s"; grep -E "crops=12" $W/bench_sweep_pdl$pdl.log | cut -c1-175
done
timeout 250 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans" $W/bench.log | cut -c1-175
timeout 40 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"; grep -E "us of kernels" $W/profile.log
( export OMP_NUM_THREADS=4; timeout 45 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json ) > $W/bench_micro.log 2>&1
echo "micro done at $((SECONDS - T0)) s"; tail -n 3 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
