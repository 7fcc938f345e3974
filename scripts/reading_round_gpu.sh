#!/usr/bin/env bash
# The reading round of micro's training in one device command: reading-pretraining variants side by
# side (one per GPU, fresh vision tower, 224 px crops), the variant with the best final character
# accuracy feeds a first training chunk over every GPU, and scripts/reading_check.py then says
# whether the language model reads through the new tower (own vs swapped image).
#   RUN=/tmp/reading OUT_DIR=$OUT READER_MINUTES=3.3 MINUTES=3.8 scripts/reading_round_gpu.sh -- <train_micro.py arguments>
# Later chunks resume the same run: RUN=/tmp/reading/train scripts/train_micro_gpu.sh train <same arguments>.
# The reader variants differ only in batch size and learning rate (the one knob whose GPU optimum the
# CPU run could not tell us); everything they write stays in $RUN, the logs and the choice go to OUT_DIR.
set -uo pipefail
run=${RUN:-/tmp/reading}
out=${OUT_DIR:?set OUT_DIR}
minutes=${READER_MINUTES:-3.3}
[ "${1:-}" = "--" ] && shift
mkdir -p "$run" "$out"
gpus=$(nvidia-smi -L | wc -l)
variants=("--batch-size 256 --lr 1e-3" "--batch-size 512 --lr 2e-3" "--batch-size 1024 --lr 3e-3" "--batch-size 512 --lr 1e-3")
count=$(( gpus < ${#variants[@]} ? gpus : ${#variants[@]} ))
workers=$(( ($(nproc) - 2) / count ))
for (( i = 0; i < count; i++ )); do
  # Each variant is one `train_micro_gpu.sh reader` step on its own GPU; --steps far beyond reach:
  # the chunk stops on time, then exports at the step it reached.
  ( RUN="$run/reader$i" OUT_DIR="$run/reader$i" GPU=$i WORKERS=$workers MINUTES=$minutes scripts/train_micro_gpu.sh reader \
      --fresh-vision --crop-px 224 ${variants[$i]} --steps 1000000 > "$run/reader$i.out" 2>&1
    cp "$run/reader$i/reader_log.jsonl" "$out/reader${i}_log.jsonl" ) &
done
wait
best=$(python3 - "$run" "$count" "${variants[@]}" <<'EOF' | tee "$out/reader_choice.txt" | tail -n 1
import json, sys
run, count, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
final = {}
for i in range(count):
    lines = open(f"{run}/reader{i}/reader_log.jsonl").read().splitlines()
    final[i] = json.loads(lines[-1])
    print(f"reader{i} {variants[i]}: step {final[i]['step']} characters {final[i]['character_accuracy']:.3f} "
          f"answers {final[i]['answer_accuracy']:.3f} {final[i]['samples_per_s']:.0f} crops/s")
print(f"{run}/reader{max(final, key=lambda i: final[i]['character_accuracy'])}/reader.safetensors")
EOF
)
echo "reading pretraining chosen: $best"
RUN="$run/train" OUT_DIR="$run/train_out" scripts/train_micro_gpu.sh train --init-from "$best" "$@"
cp "$run/train/log.jsonl" "$out/train_log.jsonl"
python3 scripts/reading_check.py --weights "$run/train/transfer" --device cuda --out "$out/reading_check.json" 2>&1 | tail -n 12
