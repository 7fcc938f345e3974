# Session 22, call 5 (nvidia-h200): M3's GPU part with E4's controllers retrained on the re-recorded
# micro-h200-measured table (decision and reconfiguration timed on the GPU host).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
python3 scripts/m3_overhead.py --device-run --device cuda --out-dir "$OUT/m3" > "$OUT/m3_device.log" 2>&1
echo "m3 rc $? wall_s $(( $(date +%s) - start ))"; tail -n 5 "$OUT/m3_device.log"
