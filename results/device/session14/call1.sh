# Session 14, call 1 (one H200): L2 prefetch of the next kernels' weights in the decode step. GPU tests of
# the touched kernels; placements A/B in one process (2 rounds); a kernel timeline of the decode graph.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runtime_gpu.py tests/test_decode_gemv.py tests/test_fused_kernels.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 4 $W/gpu_tests.log
timeout 330 python3 .devscratch/s14/pf_ab.py $W 2 > $W/pf_ab.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; tail -n 40 $W/pf_ab.log | cut -c1-400
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
