# Session 12, call 2 (one H200): the prefill grouped GEMM's tiles at few (token, expert) pairs per expert.
# The H200 stage table (call 1) prefills slower at 512 tokens than at 576 with top_k 2 (6.14 vs 5.72 ms):
# at <= 16 pairs per expert the tile table picks block_m 16. Sweep block_m 16/32/64/128 at top_k 2,
# 4..32 pairs per expert, and top_k 8 at 384 and 768 tokens (48 and 96 per expert) for the 96 bound.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
nvidia-smi > $W/nvidia_smi.txt 2>&1
timeout 330 python3 scripts/bench_moe_kernels.py --sections prefill_tiles --prefill-top-k 2 --prefill-tokens 128 256 384 512 640 768 1024 --prefill-tile-block-m 16 32 64 128 --num-weight-sets 4 --out $W/tiles_k2.json > $W/tiles_k2.log 2>&1
echo "k2 rc $? at $((SECONDS - T0)) s"; grep "prefill tiles" $W/tiles_k2.log
timeout 150 python3 scripts/bench_moe_kernels.py --sections prefill_tiles --prefill-top-k 8 --prefill-tokens 384 768 832 --prefill-tile-block-m 64 128 --num-weight-sets 4 --out $W/tiles_k8.json > $W/tiles_k8.log 2>&1
echo "k8 rc $? at $((SECONDS - T0)) s"; grep "prefill tiles" $W/tiles_k8.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
