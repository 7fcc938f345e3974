# Session 24, call 2 (nvidia-h200): E4 live with online budget margins (agents.online). Session 23's
# re-timing fixed each host's offset as of when it ran, but call 4's host slowed down after it and
# FlexVLM still missed 25% of its 0.7 budgets. Here FlexVLM, the LUT and greedy, as trained and
# re-timed, are also served with an online margin (adaptive conformal inference on the budget each
# is told, one scale per budget fraction, target 5% violations, step 0.05): 16 methods. First the
# new GPU test of the renormalising router's fused decode path (call 1's ablation).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime_gpu.py -k "renormalising or fast_path_matches" 2>&1 | tail -n 3 | tee "$OUT/gpu_tests_h200.log"
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 470 --retime-per-family 3 --retime-repeats 3 \
  --online-target 0.05 --online-step 0.05 > "$OUT/e4_live.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/e4_live.log"
gzip "$OUT/e4/e4_live_records.json"
