# Session 17, call 2 (one H200): lm_warm.py (decision time vs time busy, GPU clocks, the kernel's stamped time
# line); GPU tests of the table kernel with a longer limit (call 1's 200 s ran out while compiling).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt
timeout 200 python3 .devscratch/s17/lm_warm.py $W > $W/lm_warm.log 2>&1
echo "warm rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_warm.log | grep "name\|labels" | cut -c1-400; tail -n 3 $W/lm_warm.log
timeout 360 python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=5 tests/test_lm_gpu.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 12 $W/gpu_tests.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
