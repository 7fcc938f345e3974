# Session 17, call 7 (one H200): what the host's two CPU speeds follow. host_probe.py unpinned (60 s), pinned
# to CPU 3 (30 s) and to CPU 11 (30 s); then M3's device run pinned to CPU 3.
T0=$SECONDS; W=$OUT/w; mkdir -p $W
(lscpu; nproc; grep MHz /proc/cpuinfo) > $W/cpu.txt 2>&1; head -20 $W/cpu.txt | grep -i "model name\|thread\|core\|socket\|MHz\|hyper" 
timeout 80 python3 .devscratch/s17/host_probe.py $W/probe_unpinned.json 60 2>&1 | tail -1
timeout 50 taskset -c 3 python3 .devscratch/s17/host_probe.py $W/probe_cpu3.json 30 2>&1 | tail -1
timeout 50 taskset -c 11 python3 .devscratch/s17/host_probe.py $W/probe_cpu11.json 30 2>&1 | tail -1
echo "probes at $((SECONDS - T0)) s"
timeout 120 taskset -c 3 python3 scripts/m3_overhead.py --device-run --device cuda --out-dir $W/m3_cpu3 > $W/m3_cpu3.log 2>&1
echo "m3 rc $? at $((SECONDS - T0)) s"
python3 -c "
import json; d = json.load(open('$W/m3_cpu3/m3_device.json'))['decision']
for s, v in d.items(): print(s, {k: round(x['median'] * 1000, 1) for k, x in v.items()})"
tar czf $OUT/w.tgz -C $OUT w && rm -rf $W
