# Session 30, call 3 (same machine as calls 1-2, so /tmp/runs still holds their runs): more seeds for the best
# variant of call 1, GRPO at --learning-rate 2.5e-4 from a 25,200-env-step DPO controller, and a lower rate.
# - dpo25 seeds 3-4, then g_dpo25_lr (2.5e-4) from them;
# - g_dpo25_lr1e-4: GRPO at --learning-rate 1e-4 from call 1's dpo25 seeds 0-2;
# - grpo126: GRPO from a fresh model (E5's protocol) at seeds 3-4, to pair with g_dpo25_lr at those seeds.
# Then the same packing as call 2 (knob choices of the finished controllers, archive, report).
sed -n '/^python3 -m pip/,/^controller_of/p' results/device/session30/call1.sh > /tmp/call3_body.sh
cat >> /tmp/call3_body.sh <<'BODY'
for s in 3 4; do
  ( train dpo dpo25 $s 25200 && train grpo g_dpo25_lr $s 100800 --learning-rate 2.5e-4 --init-from $(controller_of dpo25_s$s) ) &
  train grpo grpo126 $s 126000 &
done
for s in 0 1 2; do train grpo g_dpo25_lr1e-4 $s 100800 --learning-rate 1e-4 --init-from $(controller_of dpo25_s$s) & done
wait
BODY
CUT=${CUT:-520} bash /tmp/call3_body.sh
rm -rf /tmp/keep; mkdir -p /tmp/keep
for d in /tmp/runs/*/; do n=$(basename $d); mkdir -p /tmp/keep/$n; tail -c 2000 /tmp/logs/$n.log > /tmp/keep/$n/log_tail.txt
  for r in $d*/; do cp $r/curves.jsonl $r/args.json /tmp/keep/$n/ 2>/dev/null; cp $r/final.json /tmp/keep/$n/ 2>/dev/null; done; done
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
for n in dpo25_s3 dpo25_s4 g_dpo25_lr_s3 g_dpo25_lr_s4 grpo126_s3 grpo126_s4 g_dpo25_lr1e-4_s0 g_dpo25_lr1e-4_s1 g_dpo25_lr1e-4_s2; do
  d=/tmp/runs/$n/; c=$(ls -d $d*/controller 2>/dev/null | head -1)
  [ -n "$c" ] && [ -f $d/done ] && timeout 60 python3 scripts/knob_choices.py $c --out /tmp/keep/$n/knob_choices.json > /dev/null 2>&1 &
done; wait
tar -C /tmp/keep -cJf $OUT/call3_runs.tar.xz .
python3 results/device/session30/report.py /tmp/keep | grep -A4 -E "_s3 |_s4 |lr1e-4"
