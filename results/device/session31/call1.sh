# Session 31, call 1 (nvidia-h200): the whole GPU test suite at this session's code, now with trl installed
# (session 26's run skipped tests/test_lm_controllers.py for lack of it), after sessions 28-30 changed the
# LM trainers (--init-from, E5's dpo_grpo pipeline).
# The tree plus the wheels must stay under 64 MiB: transformers 5.24 is not carried, so trl 1.16 runs on the
# machine's own transformers.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; python3 -c "import trl; print('trl', trl.__version__)"
git log -1 --format='commit %h' 2>/dev/null || true
start=$(date +%s)
python3 -m pytest -q -rs -p no:cacheprovider -m gpu > "$OUT/gpu_tests_h200.log" 2>&1
echo "pytest rc $? wall_s $(( $(date +%s) - start ))"; tail -n 8 "$OUT/gpu_tests_h200.log"
