# Session 19, call 1 (2 x H200): stage 5 of micro (issue 5 experiment), first training chunk.
T0=$SECONDS; nvidia-smi --query-gpu=name,driver_version --format=csv; git log -1 --format=%h
RUN=/tmp/s5 OUT_DIR=$OUT MINUTES=7.9 scripts/train_micro_gpu.sh train $(cat .devscratch/s19/args.txt)
echo "train chunk done at $((SECONDS - T0)) s"; ls -la $OUT
