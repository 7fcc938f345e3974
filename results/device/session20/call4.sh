# Session 20, call 4 (same 2 x H200 host, still warm): call 3's 64-hidden run stopped at step 900 of 1 200 on its time
# limit; resume it to the end (same arguments; the data stream is a function of the step, so more workers change
# nothing), export, and run its expert substitution.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; T0=$SECONDS; ls /tmp/f64/checkpoint >/dev/null || exit 3
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 scripts/train_micro.py --no-elastic --run-dir /tmp/f64 --export-dir /tmp/f64/export --expert-hidden 64 --crop-px 112 --batch-size 512 --total-steps 1200 --seed 0 --num-workers 28 --max-minutes 4.2 --checkpoint-minutes 10 --ranking-requests 8 > /tmp/f64_train2.log 2>&1; tail -n 4 /tmp/f64_train2.log; echo "train at $((SECONDS - T0)) s"
[ -f /tmp/f64/export/model.safetensors ] && timeout 120 python3 scripts/expert_substitution.py --weights /tmp/f64/export/model.safetensors --device cuda --requests-per-family 100 --batch-size 600 --substitutions top8 top4 top2 top1 rank2 zero --out $OUT/f64_substitution.json
gzip -c /tmp/f64/log.jsonl > $OUT/f64_train_log.jsonl.gz; cp /tmp/f64/export/model.json $OUT/f64_model.json; echo "end at $((SECONDS - T0)) s"
