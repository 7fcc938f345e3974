# Session 14, call 2 (one H200): side-stream L2 prefetch of the next block q/k/v weights.
# GPU test of the graphed decode; placements A/B in one process (2 rounds); kernel timeline of the decode graph.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runtime_gpu.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 4 $W/gpu_tests.log
timeout 330 python3 .devscratch/s14/pf_ab.py $W 2 > $W/pf_ab.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; tail -n 40 $W/pf_ab.log | cut -c1-400
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
