# Session 21, call 2 (1 x H200): the GPU tests at this session's code (xdist is not installed here, so conftest's
# core split does not apply; trl is not either, so its one GPU test skips).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
timeout 400 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/ > $OUT/gpu_tests_h200.log 2>&1; echo "pytest rc=$?"
tail -n 5 $OUT/gpu_tests_h200.log
