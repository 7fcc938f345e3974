# Session 28, call 3: settings that might make GRPO read its prompt at every seed (in call 2 the default stayed
# prompt-blind at seed 3), on the lent machine's 16 CPU cores (GPU unused; one thread per run). 15 runs of
# `flexvlm-train grpo` (name_sSEED below),
# 25,200 env steps, evaluated on 300 held-out requests x 5 budget fractions every 6,300 env steps.
# The image's transformers 5.17 lacks GRPOConfig's activation_checkpointing: 5.24 (as here) is carried.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 || exit
python3 -c "import trl, transformers, torch, datasets; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'datasets', datasets.__version__)" || exit
lscpu | grep -E "Model name|^CPU\(s\)"; nproc
declare -A T=(
  [eps0.3]="--epsilon 0.3"
  [loss_grpo]="--loss-type grpo"
  [eps0.3_loss_grpo]="--epsilon 0.3 --loss-type grpo"
  [hidden128]="--hidden-size 128 --intermediate-size 256"
  [layers4]="--num-layers 4"
)
declare -A S=([eps0.3]="0 2 3" [loss_grpo]="0 2 3" [eps0.3_loss_grpo]="0 1 3" [hidden128]="0 1 2 3" [layers4]="1 3")
rm -rf /tmp/sweep /tmp/keep /tmp/sweep_*.log
start=$(date +%s)
for name in "${!T[@]}"; do for seed in ${S[$name]}; do
  ( timeout 520 python3 -m trainers.cli grpo --no-wandb --no-baselines --seed $seed --total-env-steps 25200 \
      --eval-every-env-steps 6300 --eval-requests 300 --runs-dir /tmp/sweep/${name}_s$seed ${T[$name]} \
      > /tmp/sweep_${name}_s$seed.log 2>&1; echo "${name} seed $seed rc=$? $(( $(date +%s) - start )) s" ) &
done; done
wait
for name in $(ls /tmp/sweep); do
  mkdir -p /tmp/keep/$name; cp /tmp/sweep_$name.log /tmp/keep/$name/log.txt
  for d in /tmp/sweep/$name/*/; do cp $d/curves.jsonl $d/args.json $d/final.json /tmp/keep/$name/ 2>/dev/null; done
done
tar -C /tmp/keep -czf $OUT/sweep.tar.gz .
python3 - <<'PY'
import json, os, glob
for d in sorted(glob.glob("/tmp/keep/*")):
    try:
        lines = [json.loads(l) for l in open(f"{d}/curves.jsonl")]
    except FileNotFoundError:
        print(os.path.basename(d), "no curves"); continue
    pts = " ".join(f"{l['env_steps']}:{l['eval/reward']:.3f}" for l in lines)
    print(f"{os.path.basename(d):12s} {pts}")
    try:
        r = json.load(open(f"{d}/final.json"))["results"]["grpo"]["by_fraction"]
        print("    retention by fraction:", " ".join(f"{k}:{v['quality_retention']:.3f}" for k, v in r.items()))
    except FileNotFoundError:
        pass
PY
