# Session 16, call 3 (one H200): the final code (tree kernel at NUM_WARPS=8, one-observation host paths):
# the LM kernel's GPU tests and M3's device run.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; nvidia-smi > $W/nvidia-smi.txt 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_lm_gpu.py -k "gpu_decisions or packed" > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/gpu_tests.log
timeout 400 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3 > $W/m3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"; tail -n 30 $W/m3.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
