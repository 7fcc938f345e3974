# Session 25, call 2 (nvidia-h200): call 1 again on another separately started machine, for a host that may run slower than the table (call 1 ran at 0.99x), after the LUT's fallback change (agents/lut.py: where no
# configuration meets the violation bound, the smallest expected overshoot, not the fewest violations).
# Session 24's re-timed LUT held (9, 8, 8) for every family at 0.35 (fewest violations through a wide
# residual spread) and, with the online margin, missed 43.6% / 65.0% of its 0.7 budgets. Same protocol
# as session 24's call 2: 16 methods, re-timing 3 requests per family x 3 repeats, margin target 5%.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 470 --retime-per-family 3 --retime-repeats 3 \
  --online-target 0.05 --online-step 0.05 > "$OUT/e4_live.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/e4_live.log"
gzip "$OUT/e4/e4_live_records.json"
