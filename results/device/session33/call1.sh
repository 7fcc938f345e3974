# Session 33, call 1 (nvidia-h200): the width-capacity probe (scripts/width_capacity_probe.py). Six micro decoders
# trained from scratch on compositional fact recall, 1,024 / 16,384 / 65,536 facts (--n-symbols 16 / 64 / 128, 4
# relations, 256 answers), elastic top_k draws or top_k 8 only; recall measured at top_k 1, 2, 4, 8. All six share
# the one GPU as concurrent processes (each is launch-bound); --max-minutes guards the 10-minute command limit.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
export OMP_NUM_THREADS=2
start=$(date +%s)
for n in 16 64 128; do
  for mode in elastic no-elastic; do
    python3 scripts/width_capacity_probe.py --device cuda --n-symbols $n --steps 4000 --max-minutes 7.5 --$mode \
      --out "$OUT/probe_n${n}_${mode}.json" > "$OUT/probe_n${n}_${mode}.log" 2>&1 &
  done
done
wait
echo "wall_s $(( $(date +%s) - start ))"
for f in "$OUT"/probe_*.log; do echo "== $f"; tail -n 3 "$f"; done
