# Session 26, call 1 (nvidia-h200): the whole GPU test suite at this session's code (the LM decision-kernel
# check's cases, which tests/test_lm_gpu.py also runs compiled on the GPU, now redraw a random model
# that answers fewer than 3 distinct configurations).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
python3 -m pytest -q -rs -p no:cacheprovider -m gpu > "$OUT/gpu_tests_h200.log" 2>&1
echo "pytest rc $? wall_s $(( $(date +%s) - start ))"; tail -n 6 "$OUT/gpu_tests_h200.log"
