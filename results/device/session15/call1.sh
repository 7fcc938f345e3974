# Session 15, call 1 (one H200): GPU tests (the new LM decision kernel's included); the LM controllers' batch-1
# decision NumPy vs Triton kernel (warps 1/2/4/8, alternated twice); M3's device run (LM controllers on the GPU).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git log -1 --format=%h > $W/head.txt; git status --short > $W/status.txt
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 6 $W/gpu_tests.log
timeout 170 python3 .devscratch/s15/lm_ab.py $W/lm_ab_h200.json > $W/lm_ab.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab.log | tail -n 26
timeout 200 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3 > $W/m3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"; tail -n 4 $W/m3.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
