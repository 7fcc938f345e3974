# Session 30, call 2: resume call 1's cut runs (same commands), then pack every run's args, curves and final
# evaluation, and the knob choices of the final controllers (scripts/knob_choices.py, 900 held-out requests).
(sed -n '/^python3 -m pip/,/^done$/p' results/device/session30/call1.sh; echo wait) > /tmp/call1_body.sh
CUT=${CUT:-380} bash /tmp/call1_body.sh
mkdir -p /tmp/keep
for d in /tmp/runs/*/; do n=$(basename $d); mkdir -p /tmp/keep/$n; tail -c 2000 /tmp/logs/$n.log > /tmp/keep/$n/log_tail.txt
  for r in $d*/; do cp $r/curves.jsonl $r/args.json /tmp/keep/$n/ 2>/dev/null; cp $r/final.json /tmp/keep/$n/ 2>/dev/null; done; done
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
for d in /tmp/runs/*/; do n=$(basename $d); c=$(ls -d $d*/controller 2>/dev/null | head -1)
  [ -n "$c" ] && [ -f $d/done ] && timeout 200 python3 scripts/knob_choices.py $c --out /tmp/keep/$n/knob_choices.json > /dev/null 2>&1 &
done; wait
tar -C /tmp/keep -cJf $OUT/call2_runs.tar.xz .
python3 results/device/session30/report.py /tmp/keep
