# Session 12, call 1 (one H200): MolmoE-1B stage table with the current engine (session 11's decode,
# commit b758643), the same protocol as the shipped H100 table, then validate-stages (composition vs
# measured requests). Resumable: the table lives in .devscratch/s12/profiles (carried).
T0=$SECONDS; W=$OUT/w; mkdir -p $W; P=.devscratch/s12/profiles; mkdir -p $P
nvidia-smi > $W/nvidia_smi.txt 2>&1
export OMP_NUM_THREADS=4
cli="python3 -m flexvlm_env.profiles.cli"
timeout 420 $cli stages --preset molmoe-1b --weights random --device cuda --out $P/molmoe-1b_h200_stages --no-progress --max-minutes 6 > $W/stages.log 2>&1
echo "stages rc $? at $((SECONDS - T0)) s"; tail -n 5 $W/stages.log
timeout 150 $cli validate-stages --preset molmoe-1b --weights random --device cuda --stages $P/molmoe-1b_h200_stages --json-out $W/replay_latency_validation_molmoe-1b_h200.json --no-progress > $W/validate.log 2>&1
echo "validate rc $? at $((SECONDS - T0)) s"; tail -n 8 $W/validate.log
cp -r $P $W/profiles
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W; ls -la $OUT
