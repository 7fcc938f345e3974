# Session 9, call 1 (one H200): one-launch attention + greedy-token kernels; GPU tests, runtime bench
# (12 crops, top_k 1/8, blocks 8/16), decode profile, then micro-sweeps of the decode step's pieces.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; tail -n 3 $W/gpu_tests_h200.log
timeout 110 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 12 --top-k 1,8 --active-blocks 8,16 --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep decode/token $W/bench.log | cut -c1-130
timeout 40 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"
timeout 250 python3 .devscratch/micro_sweeps.py $W/micro_sweeps_h200.json > $W/sweeps.log 2>&1
echo "sweeps done at $((SECONDS - T0)) s"; tail -n 2 $W/sweeps.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
