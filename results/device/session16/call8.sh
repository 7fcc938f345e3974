# Session 16, call 8 (one H200): lm_ab7.py (shipped kernel at 4 / 2 warps vs the masked full-width variant).
T0=$SECONDS; W=$OUT/w; mkdir -p $W
git status --short > $W/status.txt
timeout 200 python3 .devscratch/s16/lm_ab7.py $W/lm_ab7_h200.json > $W/lm_ab7.log 2>&1
echo "ab rc $? at $((SECONDS - T0)) s"; grep -v Warning $W/lm_ab7.log | grep -o "'kind'.*" | cut -c1-170
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
