# Session 32, call 2 (nvidia-h200, the machine of call 1): part (b) of call 1 again. There the SIGINT never reached
# the sweep: a non-interactive shell starts background jobs with SIGINT ignored, so the sweep finished (2,880 rows)
# and the resume had nothing to do. Here job control is on, so the sweep gets the SIGINT as Ctrl-C would send it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
rm -rf /tmp/sweep
# (b) 2 families x 100 requests x 12 configurations, 10% of requests repeated 3 times: 2,880 timed runs in all.
# SIGINT (Ctrl-C) once two configurations' shards are on disk, i.e. in the middle of the third.
cli="python3 -m flexvlm_env.profiles.cli"
sweep="requests --preset micro --device cuda --families tally_qa text_vqa --per-family 100 --crops 1 4 12 --top-k 1 8 --active-blocks 8 16 --repeats 3 --repeat-fraction 0.1 --out /tmp/sweep --no-progress"
export OMP_NUM_THREADS=4
# Job control on: a non-interactive shell starts background jobs with SIGINT ignored (call 1's interrupt was lost so).
set -m
$cli $sweep > "$OUT/sweep_interrupted.log" 2>&1 &
pid=$!
for i in $(seq 1 600); do [ "$(ls /tmp/sweep/*.parquet 2>/dev/null | wc -l)" -ge 2 ] && break; sleep 0.1; done
sleep 0.3; kill -INT $pid; wait $pid; echo "interrupted run rc $? after $(ls /tmp/sweep/*.parquet | wc -l) shards"
python3 - <<'PY' > "$OUT/sweep_check.json"
import json
from flexvlm_env.profiles.tables import read_table
t = read_table("/tmp/sweep")
print(json.dumps({"after_interrupt_rows": len(t)}))
PY
cat "$OUT/sweep_check.json"
timeout 300 $cli $sweep > "$OUT/sweep_resumed.log" 2>&1; echo "resumed run rc $?"
python3 - <<'PY' | tee -a "$OUT/sweep_check.json"
import json
from flexvlm_env.profiles.tables import read_table
t = read_table("/tmp/sweep")
key = ["request_id", "crops", "top_k", "active_blocks", "repeat"]
print(json.dumps({"final_rows": len(t), "unique_keys": int(t[key].drop_duplicates().shape[0]),
                  "expected_rows": (200 - 20) * 12 + 20 * 3 * 12, "median_total_ms": float(t["total_ms"].median())}))
PY
