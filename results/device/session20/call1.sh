# Session 20, call 1 (1 x H200): expert substitution on the shipped micro weights, all 1 800 val requests at the
# full configuration (float32, plain path), then top8 and top1 again with every request's score kept, to compare
# with the shipped quality table request by request.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
T0=$SECONDS
python3 scripts/expert_substitution.py --device cuda --requests-per-family 200 --batch-size 600 --out $OUT/expert_substitution_h200.json 2>&1 | tail -15
echo "done at $((SECONDS - T0)) s"
python3 scripts/expert_substitution.py --device cuda --requests-per-family 200 --batch-size 600 --substitutions top8 top1 --seed 0 --keep-scores --out $OUT/check_scores.json 2>&1 | tail -3
echo "end at $((SECONDS - T0)) s"
