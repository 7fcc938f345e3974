# Session 14, call 5 (one H200), commit 5a32771's engine: warps of the attention split programs now that they
# form q/k (4, the default, against 2 and 8; one process, two rounds); then the molmoe-1b stage table and its
# validation on 200 held-out requests.
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=/tmp/st; mkdir -p $P
timeout 120 python3 .devscratch/s14/dec_ab5.py $W warps 2 w4,w8,w2 0 > $W/warps.log 2>&1
echo "warps rc $? at $((SECONDS - T0)) s"; tail -n 9 $W/warps.log
export OMP_NUM_THREADS=4
cli="python3 -m flexvlm_env.profiles.cli"
timeout 170 $cli stages --preset molmoe-1b --weights random --device cuda --out $P/molmoe-1b_h200_stages --no-progress > $W/stages.log 2>&1
echo "stages rc $? at $((SECONDS - T0)) s"
$cli consolidate $W/molmoe-1b_h200_stages.parquet $P/molmoe-1b_h200_stages > /dev/null 2>&1
timeout 100 $cli validate-stages --preset molmoe-1b --weights random --device cuda --stages $P/molmoe-1b_h200_stages --json-out $W/replay_latency_validation_molmoe-1b_h200.json --no-progress > $W/validate.log 2>&1
echo "validate rc $? at $((SECONDS - T0)) s"; tail -n 5 $W/validate.log
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
