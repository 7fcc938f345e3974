# Session 13, call 4 (one H200): the committed engine (fused quick_gelu, fused prefill q/k norm + RoPE + KV,
# uint8 sort keys, 128x128 H200 prefill tile, host preprocessing without copies): the molmoe-1b stage table
# again (latency="molmoe-1b-h200") and its validation; the full runtime grid + HF; the micro request benchmark.
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/prof; mkdir -p $P
nvidia-smi > $W/nvidia_smi.txt 2>&1
export OMP_NUM_THREADS=4
cli="python3 -m flexvlm_env.profiles.cli"
timeout 150 $cli stages --preset molmoe-1b --weights random --device cuda --out $P/molmoe-1b_h200_stages --no-progress > $W/stages.log 2>&1
echo "stages rc $? at $((SECONDS - T0)) s"
$cli consolidate $W/molmoe-1b_h200_stages.parquet $P/molmoe-1b_h200_stages > /dev/null 2>&1
timeout 90 $cli validate-stages --preset molmoe-1b --weights random --device cuda --stages $P/molmoe-1b_h200_stages --json-out $W/replay_latency_validation_molmoe-1b_h200.json --no-progress > $W/validate.log 2>&1
echo "validate rc $? at $((SECONDS - T0)) s"; tail -n 5 $W/validate.log
unset OMP_NUM_THREADS
timeout 230 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid full --crops 1,4,12 --top-k 1,2,4,8 --active-blocks 8,12,16 --hf-baseline --hf-implementations eager,grouped_mm --out $W/bench_runtime_h200.json > $W/bench.log 2>&1
echo "bench rc $? at $((SECONDS - T0)) s"; grep -E "crops=12 top_k=(1|8) blocks=(8|16)|hf-trans.*grouped" $W/bench.log | cut -c1-175
timeout 60 python3 scripts/bench_micro.py --device cuda --out $W/bench_micro_h200.json > $W/bench_micro.log 2>&1
echo "micro bench rc $? at $((SECONDS - T0)) s"; tail -n 3 $W/bench_micro.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
