# Session 11, call 5 (one H200): ablation of call 4's engine (e5eda01), decode sweep x2 each:
# A: as committed; B: attention back to two launches (split + combine kernel of 6ba11ed);
# C: the decode graph refilled (token copy + slot fill) before every replay, as before the self-advancing step.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
mkdir -p /tmp/B /tmp/C && cp -r flexvlm_env /tmp/B/ && cp -r flexvlm_env /tmp/C/
cp .devscratch/s11/old/flexvlm_env/model/decode_attention.py /tmp/B/flexvlm_env/model/decode_attention.py
printf '\n\ndef new_head_counters(n_heads, device):\n    return torch.zeros(n_heads, dtype=torch.int32, device=device)\n' >> /tmp/B/flexvlm_env/model/decode_attention.py
sed -i 's/                                    counters=cache.head_counters).reshape(1, d)/                                    ).reshape(1, d)/' /tmp/B/flexvlm_env/model/decoder.py
sed -i 's/            if state is not None and state\[0\] == slot and state\[1\] is token:/            if False:/' /tmp/C/flexvlm_env/model/generate.py
grep -c "_decode_attention_combine_kernel" /tmp/B/flexvlm_env/model/decode_attention.py; grep -n "reshape(1, d)" /tmp/B/flexvlm_env/model/decoder.py | head -3; grep -n "if False:" /tmp/C/flexvlm_env/model/generate.py
SWEEP="--preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16"
for rep in 1 2; do
  timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_A_$rep.json > $W/sweep_A_$rep.log 2>&1
  PYTHONPATH=/tmp/site:/tmp/B timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_B_$rep.json > $W/sweep_B_$rep.log 2>&1
  PYTHONPATH=/tmp/site:/tmp/C timeout 60 python3 scripts/bench_runtime.py $SWEEP --out $W/sweep_C_$rep.json > $W/sweep_C_$rep.log 2>&1
done
echo "sweeps done at $((SECONDS - T0)) s"
for f in $W/sweep_*.log; do echo "== $f"; grep -E "crops=12" $f | cut -c1-175; tail -n 2 $f | grep -i error; done
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
