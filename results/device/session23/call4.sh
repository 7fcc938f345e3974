# Session 23, call 4 (nvidia-h200, another newly started machine): call 3 again, to see whether re-timing with
# the host's residuals holds on another host (--retime-per-family 3 --retime-repeats 3: 27 train-half requests x 140
# configurations x 3 timed passes): in call 2 live latency over the re-timed prediction had a P95
# of 1.17-1.20, against the table residuals' 1.04, and re-timing by the factors alone left
# FlexVLM at 12% violations of the 0.7 budgets.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
python3 scripts/e4_system_eval.py --live --device cuda --out-dir "$OUT/e4" --time-limit-s 420 --retime-per-family 3 --retime-repeats 3 > "$OUT/e4_live.log" 2>&1
echo "e4 live rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/e4_live.log"
gzip "$OUT/e4/e4_live_records.json"
