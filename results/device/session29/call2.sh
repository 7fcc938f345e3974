# Session 29, call 2 (as run the second time; the first sent SIGUSR1 to `timeout`, not to python, and killed it): call 1's `long_budget_last` seed 1 stopped advancing at 7,484 env steps, 37 s into the run, and
# sat there until its 560 s cut. Run it again, twice at once, and when a run has not advanced for 40 s print where
# every thread waits (faulthandler on SIGUSR1, from reorder_run.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 || exit
lscpu | grep -E "Model name"
start=$(date +%s)
for copy in a b; do
  ORDER=budget_last python3 results/device/session29/reorder_run.py grpo --no-wandb --no-baselines --seed 1 \
    --total-env-steps 126000 --eval-every-env-steps 12600 --eval-requests 300 --runs-dir /tmp/hang_$copy > /tmp/hang_$copy.log 2>&1 &
  echo "copy $copy pid $!"; eval "pid_$copy=$!"
done
declare -A last=([a]=start [b]=start) since=([a]=0 [b]=0) dumped=()
while kill -0 $pid_a 2>/dev/null || kill -0 $pid_b 2>/dev/null; do
  sleep 10
  for copy in a b; do
    pid=$(eval echo \$pid_$copy); kill -0 $pid 2>/dev/null || continue
    now=$(tr '\r' '\n' < /tmp/hang_$copy.log | grep -o '| [0-9]*/126000' | tail -1)
    t=$(( $(date +%s) - start ))
    if [[ "$now" != "${last[$copy]}" ]]; then last[$copy]=$now; since[$copy]=$t; continue; fi
    if (( t - ${since[$copy]} >= 40 )) && [[ -z "${dumped[$copy]}" ]]; then
      dumped[$copy]=1
      echo "=== copy $copy stalled at '$now' since ${since[$copy]} s (now $t s)"
      kill -USR1 $pid; sleep 3; kill -USR1 $pid; sleep 2
      ps -o pid,stat,pcpu,rss,etime,cmd -p $pid
      top -b -n 1 -H -p $pid | head -12
      kill $pid
    fi
  done
  (( $(date +%s) - start > 420 )) && break
done
for copy in a b; do
  echo "=== copy $copy: last progress $(tr '\r' '\n' < /tmp/hang_$copy.log | grep -o '| [0-9]*/126000' | tail -1)"
  tr '\r' '\n' < /tmp/hang_$copy.log | grep -v "env step/s" | tail -80
done
pkill -f reorder_run.py; true
