# Session 10, call 1 (one H200): PDL + RoPE tables + embed kernel. GPU tests; decode A/B with and
# without PDL (molmoe-1b, 12 crops, sweep grid); profile with PDL.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" | tee $W/versions.txt
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error|error" $W/gpu_tests_h200.log | tail -n 12
for pdl in 1 0; do
  FLEXVLM_PDL=$pdl timeout 110 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16 --out $W/bench_pdl$pdl.json > $W/bench_pdl$pdl.log 2>&1
  echo "bench PDL=$pdl done at $((SECONDS - T0)) s"; grep -E "crops=12" $W/bench_pdl$pdl.log | cut -c1-175; tail -n 3 $W/bench_pdl$pdl.log | grep -i error
done
timeout 60 python3 scripts/profile_decode.py --out $W/profile_decode_pdl1.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"; head -n 40 $W/profile.log | cut -c1-160
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
