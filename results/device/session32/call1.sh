# Session 32, call 1 (nvidia-h200): (a) the whole GPU test suite after this session's model-loading changes
# (tensor names checked on the meta device before allocation, a checkpoint directory read as its file, NumPy knob
# values, the 1-pixel preprocessing floor); (b) a killed `flexvlm-profile requests` sweep on the GPU resumes with
# every finished measurement kept and none duplicated (rows are now written per configuration and on SIGINT).
# transformers 5.24 is not carried (64 MiB limit): trl 1.16 runs on the machine's transformers.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
start=$(date +%s)
python3 -m pytest -q -rs -p no:cacheprovider -m gpu > "$OUT/gpu_tests_h200.log" 2>&1
echo "pytest rc $? wall_s $(( $(date +%s) - start ))"; tail -n 6 "$OUT/gpu_tests_h200.log"
# (b) 2 families x 100 requests x 12 configurations, 10% of requests repeated 3 times: 2,880 timed runs in all.
# SIGINT (Ctrl-C) once two configurations' shards are on disk, i.e. in the middle of the third.
cli="python3 -m flexvlm_env.profiles.cli"
sweep="requests --preset micro --device cuda --families tally_qa text_vqa --per-family 100 --crops 1 4 12 --top-k 1 8 --active-blocks 8 16 --repeats 3 --repeat-fraction 0.1 --out /tmp/sweep --no-progress"
export OMP_NUM_THREADS=4
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
