# Session 17, call 3 (one H200): lm_ab9.py (kernel variants: MLP chunked over the intermediate size, mask rebuilt
# per use, cos/sin loaded per layer; replay time, decisions vs NumPy; the stamped v3 time line).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt
timeout 420 python3 .devscratch/s17/lm_ab9.py $W/lm_ab9_h200.json > $W/lm_ab9.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab9.log | grep -o "'kind'.*\|labels.*" | sed "s/'kind': //; s/'path': //" | cut -c1-150
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
