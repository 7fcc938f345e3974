# Session 29, call 1: does ending GRPO's prompt with the budget token help? On the lent machine's CPU cores (GPU
# unused; one thread per run). `reorder_run.py` (ORDER=budget_last) runs `flexvlm-train grpo` with the prompt's tokens
# reordered: `<bos> config: family <10 request features> budget_ms budget_fraction`, so the position the answer
# is read from holds the budget itself; the default ends with `config:`, and the budget is reached only by attention.
# 15 runs at once: 126,000 env steps (E5's length) at seeds 0-2 with and without the reorder; 25,200 env steps
# (session 28's sweep length) with the reorder at seeds 0-7 and the default at seed 3 (session 28's prompt-blind
# run, to check that this host reproduces it). Each run is cut at 560 s; a cut run resumes in the next call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 || exit
python3 -c "import trl, transformers, torch, datasets; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'datasets', datasets.__version__)" || exit
lscpu | grep -E "Model name|^CPU\(s\)"; nproc
mkdir -p /tmp/runs /tmp/logs
start=$(date +%s)
run() {  # name seed steps eval_every order
  local name=$1 seed=$2 steps=$3 every=$4 order=$5 resume=""
  local dir=/tmp/runs/${name}_s$seed
  if ls -d $dir/*/ >/dev/null 2>&1; then resume="--resume $(ls -d $dir/*/ | head -1)"; fi
  ( ORDER=$order timeout 560 python3 results/device/session29/reorder_run.py grpo --no-wandb --no-baselines --seed $seed \
      --total-env-steps $steps --eval-every-env-steps $every --eval-requests 300 --runs-dir $dir $resume \
      >> /tmp/logs/${name}_s$seed.log 2>&1; echo "${name} seed $seed rc=$? $(( $(date +%s) - start )) s" ) &
}
for s in 0 1 2; do run long_budget_last $s 126000 12600 budget_last; run long_default $s 126000 12600 none; done
for s in 0 1 2 3 4 5 6 7; do run short_budget_last $s 25200 6300 budget_last; done
run short_default 3 25200 6300 none
wait
mkdir -p /tmp/keep
for d in /tmp/runs/*/; do n=$(basename $d); mkdir -p /tmp/keep/$n; tail -c 2000 /tmp/logs/$n.log > /tmp/keep/$n/log_tail.txt
  for r in $d*/; do cp $r/curves.jsonl $r/args.json /tmp/keep/$n/ 2>/dev/null; cp $r/final.json /tmp/keep/$n/ 2>/dev/null; done; done
tar -C /tmp/keep -cJf $OUT/call1_runs.tar.xz .
python3 results/device/session29/report.py /tmp/keep
