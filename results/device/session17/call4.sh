# Session 17, call 4 (one H200): lm_ab10.py (v3, v4, v5 against session 16's kernel;
# replay time, decisions vs NumPy; the stamped v5 time line).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt
timeout 420 python3 .devscratch/s17/lm_ab10.py $W/lm_ab10_h200.json > $W/lm_ab10.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab10.log | grep -o "'kind'.*\|labels.*" | sed "s/'kind': //; s/'path': //" | cut -c1-150
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
