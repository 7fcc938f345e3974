# Session 24, call 3 (nvidia-h200, another newly started machine): call 2's E4 live run again, for a
# second host, after the whole GPU test suite at this session's code.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -m gpu 2>&1 | tail -n 4 | tee "$OUT/gpu_tests_h200.log"
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 400 --retime-per-family 3 --retime-repeats 3 \
  --online-target 0.05 --online-step 0.05 > "$OUT/e4_live.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/e4_live.log"
gzip "$OUT/e4/e4_live_records.json"
