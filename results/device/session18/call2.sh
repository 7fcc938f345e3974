# Session 18, call 2 (one H200): issue 4's measurements on the working tree (engine unchanged since commit
# aec2b19): the full runtime grid + Hugging Face OLMoE in the same run, then every GPU test, then M3 once more.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; git log -1 --format=%h > $W/head.txt; nvidia-smi --query-gpu=name,driver_version --format=csv > $W/gpu.txt
timeout 300 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench rc $? at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans.*grouped" $W/bench.log | cut -c1-175
timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 tests/ > $W/gpu_tests.log 2>&1
echo "tests rc $? at $((SECONDS - T0)) s"; tail -n 9 $W/gpu_tests.log
pkill -f interpret_check || true
timeout 60 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_run3 > $W/m3_run3.log 2>&1
echo "m3 run3 rc $? at $((SECONDS - T0)) s"; python3 .devscratch/s18/m3_print.py $W/m3_run3/m3_device.json
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
