# Session 17, call 6 (one H200): the final code with M3's decision timing taking turns between controllers
# (10 rounds); M3's device run twice on the same host (run 1 is the one merged into results, chosen before it ran).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt; nvidia-smi --query-gpu=name,driver_version --format=csv > $W/gpu.txt
for run in 1 2; do
  timeout 200 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_run$run > $W/m3_run$run.log 2>&1
  echo "m3 run $run rc $? at $((SECONDS - T0)) s"; tail -n 1 $W/m3_run$run.log
done
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
