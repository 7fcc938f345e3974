# Session 10, call 5 (one H200): the committed code after the last edits (PDL gated on Triton's grid
# dependency control; docs). GPU tests; decode sweep to confirm PDL is on and the times unchanged.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
python3 -c "import torch; from flexvlm_env.model.fused_kernels import pdl_enabled; print('pdl_enabled', pdl_enabled(torch.zeros(1, device='cuda')))" | tee $W/pdl_enabled.txt
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $W/gpu_tests_h200.log 2>&1
echo "tests done at $((SECONDS - T0)) s"; grep -E "passed|failed|Error" $W/gpu_tests_h200.log | tail -n 12
timeout 60 python3 scripts/bench_runtime.py --preset molmoe-1b --weights random --grid sweep --crops 12 --top-k 1,8 --active-blocks 8,16 --out $W/bench_sweep.json > $W/bench_sweep.log 2>&1
echo "sweep done at $((SECONDS - T0)) s"; grep -E "crops=12" $W/bench_sweep.log | cut -c1-175
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
