# Session 15, call 3 (one H200): the full-width decision kernel. M3's device run first (LM controllers on
# the GPU with it), then its GPU test, then NumPy / call 1's kernel / the new one at 4 and 8 warps.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
timeout 70 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3 > $W/m3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"; tail -n 2 $W/m3.log
timeout 50 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_lm_gpu.py > $W/gpu_tests_lm.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/gpu_tests_lm.log
timeout 100 python3 .devscratch/s15/lm_ab2.py $W/lm_ab2_h200.json > $W/lm_ab2.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab2.log | tail -n 24
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
