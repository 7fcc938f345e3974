# Session 16, call 1 (one H200): the LM decision kernel's GPU tests; lm_ab3.py (sequential vs token-tree kernel,
# warps, host paths; MLP controllers' one-observation path).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git log -1 --format=%h > $W/head.txt; git status --short > $W/status.txt
nvidia-smi > $W/nvidia-smi.txt 2>&1
[ -n "$SKIP_TESTS" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_lm_gpu.py tests/test_ppo_controller.py -k "gpu or kernel or packed or device or batch_1" > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 4 $W/gpu_tests.log
timeout 300 python3 .devscratch/s16/lm_ab3.py $W/lm_ab3_h200.json > $W/lm_ab3.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab3.log | grep -o "'kind'.*" | cut -c1-150 | tail -n 80
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
