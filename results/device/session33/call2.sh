# Session 33, call 2 (nvidia-h200): (a) the GPU tests of training and LoRA after the ViT's fused add + LayerNorm was
# kept out of autocast (call 1's probes all failed at their no-grad bf16-autocast recall with "residual must match
# x"; finetune_lora.py's anchor reference runs the same way); (b) the width-capacity probe again, recall now in
# float32: eight micro decoders from scratch on compositional fact recall, 1,024 / 16,384 / 65,536 / 262,144 facts
# (--n-symbols 16 / 64 / 128 / 256, 4 relations, 256 answers), elastic top_k draws or top_k 8 only, 3,000 steps x 512,
# concurrent processes on the one GPU; recall at top_k 1, 2, 4, 8 on 16,384 facts (all of them when fewer).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_training.py tests/test_lora.py > "$OUT/gpu_tests_training_lora.log" 2>&1
echo "pytest rc $?"; tail -n 3 "$OUT/gpu_tests_training_lora.log"
export OMP_NUM_THREADS=2
start=$(date +%s)
for n in 16 64 128 256; do
  for mode in elastic no-elastic; do
    python3 scripts/width_capacity_probe.py --device cuda --n-symbols $n --steps 3000 --max-minutes 7.2 --$mode \
      --out "$OUT/probe_n${n}_${mode}.json" > "$OUT/probe_n${n}_${mode}.log" 2>&1 &
  done
done
wait
echo "wall_s $(( $(date +%s) - start ))"
for f in "$OUT"/probe_*.log; do echo "== $f"; tail -n 2 "$f"; done
