# Session 29, call 3: call 2's stalled run (`reorder_run.py`, ORDER=budget_last, seed 1, 126,000 env steps) again,
# with trainers/grpo.py's new stop after --max-invalid-batches (50) generated batches in a row without a valid
# completion. Expected: the run ends by itself shortly after 7,484 env steps, says why, and is evaluated there.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 || exit
start=$(date +%s)
ORDER=budget_last timeout 400 python3 results/device/session29/reorder_run.py grpo --no-wandb --no-baselines --seed 1 \
  --total-env-steps 126000 --eval-every-env-steps 12600 --eval-requests 300 --runs-dir /tmp/stop > /tmp/stop.log 2>&1
echo "rc=$? after $(( $(date +%s) - start )) s"
tr '\r' '\n' < /tmp/stop.log | grep -v "env step/s" | grep -v Warning | tail -12
run=$(ls -d /tmp/stop/*/)
python3 - "$run" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1] + "curves.jsonl")]
for l in lines:
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in l.items()
           if k in ("env_steps", "eval/reward", "train/invalid_rate", "train/unconstrained_invalid_rate",
                    "train/optimizer_steps", "train/entropy", "train/entropy_coef")})
PY
mkdir -p /tmp/keep && cp $run/curves.jsonl $run/args.json $run/final.json /tmp/keep/ && tar -C /tmp/keep -cJf $OUT/call3_run.tar.xz .
