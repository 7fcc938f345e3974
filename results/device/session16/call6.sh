# Session 16, call 6 (one H200): the final code (tree kernel, TF32x3 at 4 warps by default, lean wrapper): every GPU
# test of the decision kernel (trained and random models, other shapes and grids, both precisions);
# lm_ab5.py (default vs IEEE vs a fused-projection variant); M3's device run.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_lm_gpu.py > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/gpu_tests.log
timeout 150 python3 .devscratch/s16/lm_ab5.py $W/lm_ab5_h200.json > $W/lm_ab5.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab5.log | grep -o "'kind'.*" | cut -c1-150
timeout 200 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3 > $W/m3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"; tail -n 2 $W/m3.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
