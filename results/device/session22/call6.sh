# Session 22, call 6 (nvidia-h200, another separately started machine): E4 live again with the same
# controllers, to see how much of the live/replay residual belongs to the host.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 200 > "$OUT/e4_live_2.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 3 "$OUT/e4_live_2.log"
