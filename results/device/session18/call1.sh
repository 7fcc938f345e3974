# Session 18, call 1 (one H200): the working tree's batch-1 host path of the LM controllers (prompt ids in
# plain Python, config index from a dict, the answer polled in pinned memory). M3's device run first; then
# lm_ab12.py (HEAD's host path against the new one, taking turns); the GPU tests of the decision kernel; M3 again.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; nvidia-smi --query-gpu=name,driver_version --format=csv > $W/gpu.txt
timeout 150 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_run1 > $W/m3_run1.log 2>&1
echo "m3 run1 rc $? at $((SECONDS - T0)) s"; python3 .devscratch/s18/m3_print.py $W/m3_run1/m3_device.json
timeout 120 python3 .devscratch/s18/lm_ab12.py $W/lm_ab12_h200.json > $W/lm_ab12.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab12.log | cut -c1-200
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=5 tests/test_lm_gpu.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 9 $W/gpu_tests.log
pkill -f _lm_gpu_interpret_check || true
timeout 150 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_run2 > $W/m3_run2.log 2>&1
echo "m3 run2 rc $? at $((SECONDS - T0)) s"; python3 .devscratch/s18/m3_print.py $W/m3_run2/m3_device.json
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
