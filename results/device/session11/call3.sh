# Session 11, call 3 (one H200): + the q/k norms, RoPE and KV write in the q/k/v GEMV's last program
# (decode_qkv_rope_kv); LM-head tile 16/512/8 from call 2. GPU tests; decode sweep with the epilogue
# and without it (decoder.QKV_EPILOGUE=False in a copy) x2; profile; MoE tile sweep at top_k 1 with PDL.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
mkdir -p /tmp/noepi && cp -r flexvlm_env /tmp/noepi/ && sed -i 's/^QKV_EPILOGUE = True/QKV_EPILOGUE = False/' /tmp/noepi/flexvlm_env/model/decoder.py
grep -n "^QKV_EPILOGUE" /tmp/noepi/flexvlm_env/model/decoder.py
SWEEP="--preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16"
for rep in 1 2; do
  timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_epi_$rep.json > $W/sweep_epi_$rep.log 2>&1
  PYTHONPATH=/tmp/site:/tmp/noepi timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_noepi_$rep.json > $W/sweep_noepi_$rep.log 2>&1
done
echo "sweeps done at $((SECONDS - T0)) s"
for f in $W/sweep_*.log; do echo "== $f"; grep -E "crops=12" $f | cut -c1-175; done
timeout 40 python3 scripts/profile_decode.py --out $W/profile_decode_h200.json > $W/profile.log 2>&1
echo "profile done at $((SECONDS - T0)) s"; grep -E "us of kernels" $W/profile.log
timeout 170 python3 scripts/bench_decode_kernels.py --sections moe --top-k 1 --out $W/bench_decode_kernels_moe1_h200.json > $W/moe.log 2>&1
echo "moe sweep done at $((SECONDS - T0)) s"; tail -n 4 $W/moe.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
