# Session 17, call 5 (one H200): the final code. M3's device run first, on a quiet host (call 1's ran beside a
# test process that its timeout had left running); lm_ab11.py (session 16's kernel against the final one);
# the GPU tests of the decision kernel; M3's device run again (how much the same host varies).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; nvidia-smi --query-gpu=name,driver_version --format=csv > $W/gpu.txt
timeout 150 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3 > $W/m3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"; tail -n 1 $W/m3.log
timeout 120 python3 .devscratch/s17/lm_ab11.py $W/lm_ab11_h200.json > $W/lm_ab11.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab11.log | grep -o "'kind'.*" | sed "s/'kind': //; s/'path': //" | cut -c1-150
timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=5 tests/test_lm_gpu.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 9 $W/gpu_tests.log
pkill -f _lm_gpu_interpret_check || true
timeout 150 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_run2 > $W/m3_run2.log 2>&1
echo "m3 run2 rc $? at $((SECONDS - T0)) s"; tail -n 1 $W/m3_run2.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
