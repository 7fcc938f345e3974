# Session 18, call 4 (one H200): the final code (call 3's + the masked policies' batch-1 argmax over a prefix mask picked by bisection,
# LatencyGuardrail.argmax_allowed): M3's device run twice on the same host. The run to merge is the one with
# the larger worst share (the conservative pick), decided before they ran.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; nvidia-smi --query-gpu=name,driver_version --format=csv > $W/gpu.txt
for run in 6 7; do
  timeout 150 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_run$run > $W/m3_run$run.log 2>&1
  echo "m3 run$run rc $? at $((SECONDS - T0)) s"; python3 .devscratch/s18/m3_print.py $W/m3_run$run/m3_device.json
done
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
