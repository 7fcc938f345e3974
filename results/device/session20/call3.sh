# Session 20, call 3 (2 x H200, same host): call 2 again with --no-elastic (every batch at the full configuration), so that no top-1 draws train the width knob. Two micro models trained from
# scratch side by side with the same recipe (112 px crops, 1 200 steps x 512, seed 0), one per
# GPU, differing only in --expert-hidden (16 as shipped; 64, MolmoE-1B's ratio of half d_model); then each one's
# expert substitution at the full configuration (100 val requests per family).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; T0=$SECONDS
common="--crop-px 112 --batch-size 512 --total-steps 1200 --seed 0 --num-workers 14 --max-minutes 6 --checkpoint-minutes 10 --ranking-requests 8"
for h in 16 64; do
  i=$([ $h = 16 ] && echo 0 || echo 1)
  CUDA_VISIBLE_DEVICES=$i timeout 420 python3 scripts/train_micro.py --no-elastic --run-dir /tmp/f$h --export-dir /tmp/f$h/export --expert-hidden $h $common > /tmp/f${h}_train.log 2>&1 &
done
wait; echo "train done at $((SECONDS - T0)) s"
for h in 16 64; do
  i=$([ $h = 16 ] && echo 0 || echo 1)
  tail -n 4 /tmp/f${h}_train.log
  [ -f /tmp/f$h/export/model.safetensors ] && CUDA_VISIBLE_DEVICES=$i timeout 150 python3 scripts/expert_substitution.py --weights /tmp/f$h/export/model.safetensors \
    --device cuda --requests-per-family 100 --batch-size 600 --substitutions top8 top4 top2 top1 rank2 zero --out $OUT/f${h}_substitution.json > /tmp/f${h}_eval.log 2>&1 &
done
wait; echo "eval done at $((SECONDS - T0)) s"
for h in 16 64; do cat /tmp/f${h}_eval.log; gzip -c /tmp/f$h/log.jsonl > $OUT/f${h}_train_log.jsonl.gz; cp /tmp/f$h/export/model.json $OUT/f${h}_model.json 2>/dev/null; done
ls -la $OUT
