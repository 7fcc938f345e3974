# Session 30, call 1: GRPO started from a DPO controller (`--init-from`), the usual RLHF order (preference-tuned
# policy, then RL), against GRPO from a fresh model (E5: 0.599) and DPO alone (E5: 0.613). On the lent machine's CPU
# cores (GPU unused; one thread per run), 15 runs at once:
# - dpo25:  DPO, E5's settings, 25,200 env steps, seeds 0-2 (DPO's held-out reward plateaus by ~12,600 in E5)
# - dpo126: DPO, E5's settings and length (126,000), seeds 0-2
# - g_dpo25:      GRPO from dpo25, 100,800 env steps (126,000 in all: E5's budget), defaults, seeds 0-2
# - g_dpo25_lr:   the same at --learning-rate 2.5e-4 (a gentler fine-tune of a policy that already reads the budget)
# - g_dpo126:     GRPO from dpo126, 126,000 env steps, defaults, seeds 0-2 (252,000 in all)
# Each command is cut at 560 s (CUT); a cut run resumes in the next call (`--resume`), the machine keeping /tmp.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 || exit
python3 -c "import trl, transformers, torch, datasets; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'datasets', datasets.__version__)" || exit
lscpu | grep -E "Model name|^CPU\(s\)"; nproc
mkdir -p /tmp/runs /tmp/logs
start=$(date +%s)
left() { echo $(( ${CUT:-560} - ($(date +%s) - start) )); }
train() {  # method name seed steps [extra...]: runs or resumes /tmp/runs/NAME_sSEED, cut at the call's 560 s
  local method=$1 name=$2 seed=$3 steps=$4; shift 4
  local dir=/tmp/runs/${name}_s$seed resume=""
  if [ -f $dir/done ]; then return 0; fi
  if ls -d $dir/*/ >/dev/null 2>&1; then resume="--resume $(ls -d $dir/*/ | head -1)"; fi
  timeout $(left) python3 -m trainers.cli $method --no-wandb --no-baselines --seed $seed --total-env-steps $steps \
      --eval-every-env-steps 12600 --runs-dir $dir $resume "$@" >> /tmp/logs/${name}_s$seed.log 2>&1
  local rc=$?; echo "$name seed $seed rc=$rc $(( $(date +%s) - start )) s"; [ $rc = 0 ] && touch $dir/done; return $rc
}
controller_of() { ls -d /tmp/runs/$1/*/controller 2>/dev/null | head -1; }
for s in 0 1 2; do
  ( train dpo dpo25 $s 25200 && for lr in 1e-3 2.5e-4; do
      name=g_dpo25; [ $lr = 2.5e-4 ] && name=g_dpo25_lr
      train grpo $name $s 100800 --learning-rate $lr --init-from $(controller_of dpo25_s$s) & done; wait ) &
  ( train dpo dpo126 $s 126000 && train grpo g_dpo126 $s 126000 --init-from $(controller_of dpo126_s$s) ) &
done
wait
echo "call done at $(( $(date +%s) - start )) s"
