# Session 19, call 2 (same 2 x H200 host): finish stage 5, then every val request at all 140 configurations.
T0=$SECONDS
RUN=/tmp/s5 OUT_DIR=$OUT MINUTES=4.2 scripts/train_micro_gpu.sh train $(cat .devscratch/s19/args.txt)
echo "train done at $((SECONDS - T0)) s"
if [ -f /tmp/s5/export/model.safetensors ]; then
  WEIGHTS=/tmp/s5/export/model.safetensors MINUTES=4 scripts/profile_gpu.sh quality
  echo "quality done at $((SECONDS - T0)) s"
  python3 -m flexvlm_env.profiles.cli consolidate $OUT/stage5_quality_val.parquet runs/profiles/micro_quality_x2/shard-* 2>&1 | tail -3
  cp runs/profiles/quality-shard-*.log $OUT/ 2>/dev/null
fi
echo "end at $((SECONDS - T0)) s"; ls -la $OUT
