# Session 31, call 2 (nvidia-h200): the practitioner's flow on a GPU, for the own-tables feature: profile the shipped
# micro on this H200 with flexvlm-profile (quality, then every (request, configuration) timed end to end) over a small
# pool (3 families x 20 procedural val requests, all 140 configurations), consolidate both tables, and bring them back;
# a controller is then trained on them on the sandbox's CPU (`flexvlm-train ... --quality q.parquet --latency r.parquet`).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
POOL="--preset micro --families tally_qa doc_qa text_vqa --per-family 20 --no-progress"
start=$(date +%s)
python3 -m flexvlm_env.profiles.cli quality --out /tmp/own/q $POOL > "$OUT/quality.log" 2>&1; echo "quality rc $? at $(( $(date +%s) - start )) s"
OMP_NUM_THREADS=4 python3 -m flexvlm_env.profiles.cli requests --out /tmp/own/r $POOL > "$OUT/requests.log" 2>&1; echo "requests rc $? at $(( $(date +%s) - start )) s"
python3 -m flexvlm_env.profiles.cli consolidate "$OUT/micro_quality_3fam_h200.parquet" /tmp/own/q
python3 -m flexvlm_env.profiles.cli consolidate "$OUT/micro_requests_3fam_h200.parquet" /tmp/own/r
ls -la "$OUT"; tail -n 3 "$OUT/quality.log" "$OUT/requests.log"
