# Session 9, call 2 (one H200): baseline bench of the current code (cuBLAS projections, H100-picked MoE
# tiles, greedy-token kernel); sweeps of greedy/GEMV/MoE tiles; bench + profile with the sweep's picks.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
BENCH="--preset molmoe-1b --weights random --grid full --crops 12 --top-k 1,2,4,8 --active-blocks 8,16"
timeout 80 python3 scripts/bench_runtime.py $BENCH --out $W/bench_base_h200.json > $W/bench_base.log 2>&1
echo "base bench done at $((SECONDS - T0)) s"; grep decode/token $W/bench_base.log | cut -c1-140
timeout 330 python3 .devscratch/micro_sweeps.py $W/micro_sweeps_h200.json > $W/sweeps.log 2>&1
echo "sweeps done at $((SECONDS - T0)) s"; tail -n 2 $W/sweeps.log | cut -c1-300
timeout 80 python3 .devscratch/tuned_bench.py $W/micro_sweeps_h200.json $W/choice.json scripts/bench_runtime.py $BENCH --out $W/bench_tuned_h200.json > $W/bench_tuned.log 2>&1
echo "tuned bench done at $((SECONDS - T0)) s"; grep -E "decode/token|dense_gemv" $W/bench_tuned.log | cut -c1-140
timeout 40 python3 .devscratch/tuned_bench.py $W/micro_sweeps_h200.json $W/choice2.json scripts/profile_decode.py --out $W/profile_tuned_h200.json > $W/profile_tuned.log 2>&1
echo "profile done at $((SECONDS - T0)) s"
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
