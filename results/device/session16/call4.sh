# Session 16, call 4 (one H200): lm_ab4.py (IEEE vs TF32x3 products in the tree kernel, warps, leaner host wrapper).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt
timeout 400 python3 .devscratch/s16/lm_ab4.py $W/lm_ab4_h200.json > $W/lm_ab4.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab4.log | grep -o "'kind'.*" | cut -c1-170 | tail -n 60
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
