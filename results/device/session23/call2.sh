# Session 23, call 2 (nvidia-h200, a newly started machine): E4 live as in call 1, with the host
# factors taken over the env's calibrated budget references (host / table) instead of the host's
# own full-configuration timings: call 1's factors came out 2.4% low, since its full-configuration
# timings ran 1.055x the table while the budgets were calibrated at 1.03x.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 400 --retime-per-family 2 > "$OUT/e4_live.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/e4_live.log"
gzip "$OUT/e4/e4_live_records.json"
