# Session 10, call 2 (one H200): + down-kernel prefetch (gate/up releases after its wait) + MoE norm
# inside the router. GPU tests; decode bench (PDL on); attention chunk sweep and decode-kernel tile
# sweeps with PDL on.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
timeout 110 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16 --out $W/bench_call2.json > $W/bench_call2.log 2>&1
echo "bench done at $((SECONDS - T0)) s"; grep -E "crops=12" $W/bench_call2.log | cut -c1-175; tail -n 3 $W/bench_call2.log | grep -i error
timeout 90 python3 scripts/bench_decode_attention.py --chunks 128 64 32 --num-warps 4 8 --out $W/bench_decode_attention_pdl.json > $W/attn.log 2>&1
echo "attn done at $((SECONDS - T0)) s"; grep -v "^wrote" $W/attn.log | tail -n 14
timeout 150 python3 scripts/bench_decode_kernels.py --top-k 1 8 --block-n 2 4 8 16 --block-k 512 1024 2048 --num-warps 2 4 8 --out $W/bench_decode_kernels_pdl.json > $W/kernels.log 2>&1
echo "kernels done at $((SECONDS - T0)) s"; tail -n 16 $W/kernels.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
