# Session 21, call 1 (2 x H200): do *smaller* experts make top_k matter? Session 20 found four times larger experts
# (64 hidden units) change nothing: micro stays a top-1 MoE. If one expert's 16 units hold all a token needs, a
# token's update can only depend on several experts when one expert is too small for it. Same recipe as session
# 20's call 2 (elastic defaults, 112 px crops, 1 200 steps x 512, seed 0), one model per GPU: --expert-hidden 4
# and 2; then each one's expert substitution at the full configuration (100 val requests per family).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; T0=$SECONDS
common="--crop-px 112 --batch-size 512 --total-steps 1200 --seed 0 --num-workers 14 --max-minutes 6 --checkpoint-minutes 10 --ranking-requests 8"
for h in 4 2; do
  i=$([ $h = 4 ] && echo 0 || echo 1)
  CUDA_VISIBLE_DEVICES=$i timeout 420 python3 scripts/train_micro.py --run-dir /tmp/h$h --export-dir /tmp/h$h/export --expert-hidden $h $common > /tmp/h${h}_train.log 2>&1 &
done
wait; echo "train done at $((SECONDS - T0)) s"
for h in 4 2; do
  i=$([ $h = 4 ] && echo 0 || echo 1)
  tail -n 4 /tmp/h${h}_train.log
  [ -f /tmp/h$h/export/model.safetensors ] && CUDA_VISIBLE_DEVICES=$i timeout 150 python3 scripts/expert_substitution.py --weights /tmp/h$h/export/model.safetensors \
    --device cuda --requests-per-family 100 --batch-size 600 --substitutions top8 top4 top2 top1 rank2 zero --out $OUT/h${h}_substitution.json > /tmp/h${h}_eval.log 2>&1 &
done
wait; echo "eval done at $((SECONDS - T0)) s"
for h in 4 2; do cat /tmp/h${h}_eval.log; gzip -c /tmp/h$h/log.jsonl > $OUT/h${h}_train_log.jsonl.gz; cp /tmp/h$h/export/model.json $OUT/h${h}_model.json 2>/dev/null; done
ls -la $OUT
