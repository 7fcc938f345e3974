# Session 17, call 1 (one H200): GPU tests of the table kernel; lm_ab8.py (shipped vs table vs table+fold); the
# 8-warp TF32x3 table kernel in its own process (it crashed in session 16's kernel); M3 device run (table kernel).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; nvidia-smi --query-gpu=name,driver_version --format=csv > $W/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_lm_gpu.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/gpu_tests.log
timeout 150 python3 .devscratch/s17/lm_ab8.py $W/lm_ab8_h200.json > $W/lm_ab8.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab8.log | grep -o "'kind'.*" | cut -c1-170
timeout 60 python3 .devscratch/s17/lm_ab8.py $W/lm_ab8_w8_h200.json w8 > $W/lm_ab8_w8.log 2>&1
echo "ab w8 rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab8_w8.log | grep -o "'kind'.*" | cut -c1-170; tail -n 2 $W/lm_ab8_w8.log
timeout 200 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3 > $W/m3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"; tail -n 2 $W/m3.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
