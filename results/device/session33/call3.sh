# Session 33, call 3 (nvidia-h200): the width-capacity probe at more facts, where call 2's elastic run began to lose
# recall at top_k 1: 16,384 / 102,400 / 147,456 facts (--n-symbols 64 / 160 / 192), elastic or top_k 8 only,
# 4,000 steps x 512, six concurrent processes on the one GPU. (n-symbols 64 repeats call 2, whose JSON did not come
# back: the device returns at most 8 files a call, so this call packs its outputs into one archive.)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export OMP_NUM_THREADS=2
mkdir -p /tmp/probe3
start=$(date +%s)
for n in 64 160 192; do
  for mode in elastic no-elastic; do
    python3 scripts/width_capacity_probe.py --device cuda --n-symbols $n --steps 4000 --max-minutes 7.6 --$mode \
      --out "/tmp/probe3/probe_n${n}_${mode}.json" > "/tmp/probe3/probe_n${n}_${mode}.log" 2>&1 &
  done
done
wait
echo "wall_s $(( $(date +%s) - start ))"
for f in /tmp/probe3/*.log; do echo "== $f"; tail -n 2 "$f"; done
tar czf "$OUT/call3.tgz" -C /tmp/probe3 .
