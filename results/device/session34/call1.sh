# Session 34, call 1 (nvidia-h200): (a) the whole GPU test suite after this session's changes (controllers check each
# observation, incl. the LM controllers' GPU batch-1 path through is_single_observation; training states and saved
# controllers get the umask's file modes; W&B sends only checkpointed points); (b) M3's device step: batch-1 decision
# and reconfiguration times of the committed controllers on the H200 host, now with the observation check.
# transformers 5.24 is not carried (64 MiB limit): trl 1.16 runs on the machine's transformers.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
start=$(date +%s)
python3 -m pytest -q -rs -p no:cacheprovider -m gpu > "$OUT/gpu_tests_h200.log" 2>&1
echo "pytest rc $? wall_s $(( $(date +%s) - start ))"; tail -n 6 "$OUT/gpu_tests_h200.log"
start=$(date +%s)
python3 scripts/m3_overhead.py --device-run --device cuda --out-dir "$OUT/m3" > "$OUT/m3_device_run.log" 2>&1
echo "m3 rc $? wall_s $(( $(date +%s) - start ))"; tail -n 15 "$OUT/m3_device_run.log"
