# Session 23, call 1 (nvidia-h200): E4 live with FlexVLM, the LUT and greedy served twice, as
# trained and re-timed on this host (--retime-per-family 2: 18 train-half requests timed at all 140
# configurations after the warm-up, agents.retime), then the GPU tests at this session's code.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 400 --retime-per-family 2 > "$OUT/e4_live.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/e4_live.log"
gzip "$OUT/e4/e4_live_records.json"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider > "$OUT/gpu_tests_h200.log" 2>&1
echo "gpu tests rc $?"; tail -n 3 "$OUT/gpu_tests_h200.log"
