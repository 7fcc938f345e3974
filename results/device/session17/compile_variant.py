"""Compile a decision-kernel module's _lm_decide_kernel for sm_90 on the CPU (no GPU): shared memory per program.
Usage: compile_variant.py MODULE_PATH BT WARPS"""
import sys, os, importlib.util, time, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
path, bt, warps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("m", path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
kern = m._lm_decide_kernel
names = [n for n in kern.arg_names if n.endswith("_ptr")]
sig = {n: "*fp32" for n in names}
for n in ("ids_ptr","out_ptr","knob_ptr","nval_ptr"): sig[n] = "*i64"
sig.update({"stamp_ptr": "*i64"} if "stamp_ptr" in kern.arg_names else {}); sig["eps"] = "fp32"; sig["scale"] = "fp32"
const = dict(P=15, L=2, D=64, NH=4, HD=16, I=128, BT=bt, NVP=8)
if "N0" in kern.arg_names: const.update(N0=7, N1=4)
if "PRECISION" in kern.arg_names: const.update(PRECISION=sys.argv[4] if len(sys.argv) > 4 else "tf32x3")
if "IC" in kern.arg_names: const.update(IC=int(os.environ.get("IC", 32)))
if "NPOS" in kern.arg_names: const.update(NPOS=17)
if "FOLD_VO" in kern.arg_names: const.update(FOLD_VO=len(sys.argv) > 5 and sys.argv[5] == "fold")
for k in const: sig[k] = "constexpr"
t0 = time.time()
src = ASTSource(fn=kern, signature=sig, constexprs={(list(kern.arg_names).index(k),): v for k, v in const.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print(path, "BT", bt, "warps", warps, "shared bytes", k.metadata.shared, "compile s", round(time.time() - t0, 1))
ptx = k.asm["ptx"]
print("wgmma", ptx.count("wgmma.mma_async"), "mma.sync", ptx.count("mma.sync"), "fma.rn.f32", ptx.count("fma.rn.f32"), "bar.sync", ptx.count("bar.sync"))
import tempfile, os, subprocess
d = tempfile.mkdtemp(); open(f"{d}/k.cubin", "wb").write(k.asm["cubin"])
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
r = subprocess.run([tool, "--dump-resource-usage", f"{d}/k.cubin"], capture_output=True, text=True)
print([l.strip() for l in r.stdout.splitlines() if "REG" in l])
r = subprocess.run([tool, "-sass", f"{d}/k.cubin"], capture_output=True, text=True)
sass = r.stdout
print("SASS lines", sass.count("\n"), "STL", sass.count(" STL"), "LDL", sass.count(" LDL"), "HGMMA", sass.count("HGMMA"), "BAR", sass.count(" BAR"))
if os.environ.get("SASS_OUT"): open(os.environ["SASS_OUT"], "w").write(sass)
