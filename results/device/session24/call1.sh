# Session 24, call 1 (nvidia-h200-x2): the router ablation, the one lever sessions 20-21 left untried.
# Six from-scratch micros (2-64 hidden units per expert, elastic or full-configuration-only) were all
# top-1 MoEs under MolmoE's router (softmax over 64 experts, kept weights not renormalised). Here the
# same recipe (112 px crops, 1 200 steps x 512, seed 0, 16 hidden units, one H200 each) trains with
# --norm-topk-prob (kept weights renormalised to sum to 1, as Mixtral / OLMoE's norm_topk_prob):
# GPU 0 with the elastic defaults, GPU 1 full configuration only (--no-elastic). Then each one's
# expert substitution at the full configuration (100 val requests per family), as in sessions 20-21.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; T0=$SECONDS
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
common="--crop-px 112 --batch-size 512 --total-steps 1200 --seed 0 --num-workers 14 --max-minutes 6.5 --checkpoint-minutes 10 --ranking-requests 8 --norm-topk-prob"
for v in elastic full; do
  i=$([ $v = elastic ] && echo 0 || echo 1); extra=$([ $v = full ] && echo --no-elastic)
  CUDA_VISIBLE_DEVICES=$i timeout 450 python3 scripts/train_micro.py --run-dir /tmp/$v --export-dir /tmp/$v/export $extra $common > /tmp/${v}_train.log 2>&1 &
done
wait; echo "train done at $((SECONDS - T0)) s"
for v in elastic full; do
  i=$([ $v = elastic ] && echo 0 || echo 1)
  tail -n 4 /tmp/${v}_train.log
  [ -f /tmp/$v/export/model.safetensors ] && CUDA_VISIBLE_DEVICES=$i timeout 120 python3 scripts/expert_substitution.py --weights /tmp/$v/export/model.safetensors \
    --device cuda --requests-per-family 100 --batch-size 600 --substitutions top8 top4 top2 top1 rank2 zero --out $OUT/normtopk_${v}_substitution.json > /tmp/${v}_eval.log 2>&1 &
done
wait; echo "eval done at $((SECONDS - T0)) s"
for v in elastic full; do
  cat /tmp/${v}_eval.log; gzip -c /tmp/$v/log.jsonl > $OUT/normtopk_${v}_train_log.jsonl.gz
  cp /tmp/$v/export/model.json $OUT/normtopk_${v}_model.json 2>/dev/null; cp /tmp/$v/export/model.safetensors $OUT/normtopk_${v}_model.safetensors 2>/dev/null
done
ls -la $OUT
