# Session 19, call 4 (2 x H200, fresh host): two continuations of stage 5, one per GPU, then each one's quality
# at the sweep configurations. The working tree's flexvlm_env/assets/micro/model.safetensors is stage 5's
# export for this call (sha256 c5bc7e90...), swapped in locally and restored after.
T0=$SECONDS; nvidia-smi --query-gpu=name,driver_version --format=csv; sha256sum flexvlm_env/assets/micro/model.safetensors | cut -c1-16
common="--init-from flexvlm_env/assets/micro/model.safetensors --crop-px 224 --batch-size 512 --total-steps 400 --lr 5e-4 --warmup-steps 30 --decay-frac 0.5 --p-smallest 0 --family-weights 0.6 0.3 1.5 1.5 0.4 1.2 0.7 3 1 --transcribe-weight 1 --num-workers 14 --max-minutes 7.2 --checkpoint-minutes 10"
CUDA_VISIBLE_DEVICES=0 timeout 470 python3 scripts/train_micro.py --run-dir /tmp/s6a --export-dir /tmp/s6a/export --seed 18 --p-full 0.9 $common > $OUT/s6a_train.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 470 python3 scripts/train_micro.py --run-dir /tmp/s6b --export-dir /tmp/s6b/export --seed 18 --p-full 0.75 --top-k-choices 2 4 8 $common > $OUT/s6b_train.log 2>&1 &
wait; echo "train done at $((SECONDS - T0)) s"; tail -n 3 $OUT/s6a_train.log $OUT/s6b_train.log
for v in a b; do
  i=$([ $v = a ] && echo 0 || echo 1)
  [ -f /tmp/s6$v/export/model.safetensors ] && CUDA_VISIBLE_DEVICES=$i timeout 170 python3 scripts/eval_micro.py --weights /tmp/s6$v/export/model.safetensors \
    --device cuda --batch-size 600 --grid-requests-per-family 1 --latency-requests 1 --latency-repeats 1 --out $OUT/s6${v}_quality_sweeps.json > $OUT/s6${v}_eval.log 2>&1 &
done
wait; echo "eval done at $((SECONDS - T0)) s"
for v in a b; do cp /tmp/s6$v/log.jsonl $OUT/s6${v}_log.jsonl; cp /tmp/s6$v/export/model.json $OUT/s6${v}_model.json; done
ls -la $OUT
