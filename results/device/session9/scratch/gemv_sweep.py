"""Device-only sweep (H200): decode_gemv tiles, q/k/v shape with the add+RMSNorm fused (1/RMS applied to
the sums) and the output projection plain, against cuBLAS (with the separate add+RMSNorm launch)."""
import json, sys, itertools
import torch, torch.nn.functional as F
import triton
from flexvlm_env.benchmarking import median_ms_graph
from flexvlm_env.model.fused_kernels import fused_add_rms_norm
from flexvlm_env.model.decode_gemv import decode_gemv, decode_gemv_reference, GemvConfig

out_path = sys.argv[1]
dev, bf = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)
R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
     "timing": "CUDA-graph replay of 16 calls over 16 weight matrices (no L2 reuse), median of 50 replays, us per call"}
def rn(*s): return torch.randn(*s, device=dev, dtype=bf, generator=g)
def t(step, reps=50): return median_ms_graph(step, reps) * 1e3 / 16
def log(row):
    R.setdefault("gemv", []).append(row); print(row, flush=True)
    open(out_path, "w").write(json.dumps(R, indent=1))
D = 2048
for n, fused in ((6144, True), (2048, False), (6144, False)):
    ws_ = [rn(n, D) * D ** -0.5 for _ in range(16)]
    xin = rn(1, D); res = rn(1, D); nwt = (1 + 0.3 * rn(D)); o = torch.empty(1, n, device=dev, dtype=bf)
    h_buf = torch.empty(1, D, device=dev, dtype=bf); r_buf = torch.empty(1, D, device=dev, dtype=bf)
    kw = dict(residual=res, norm_weight=nwt) if fused else {}
    if fused:
        log(dict(n=n, fused=True, method="add_rms_norm+cublas", us=t(lambda: [F.linear(fused_add_rms_norm(xin, res, nwt, 1e-5, out=h_buf, residual_out=r_buf)[0], w) for w in ws_])))
    else:
        log(dict(n=n, fused=False, method="cublas", us=t(lambda: [F.linear(xin, w) for w in ws_])))
    ref = decode_gemv_reference(xin, ws_[0], **kw)[0].float()
    for bn, bk, nw in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (1, 2, 4, 8)):
        if bn * bk > 32768 or bn * bk < 64 * nw: continue
        cfg = GemvConfig(bn, bk, nw)
        extra = dict(residual_out=r_buf) if fused else {}
        decode_gemv(xin, ws_[0], out=o, config=cfg, **kw, **extra); torch.cuda.synchronize()
        err = float((o.float() - ref).abs().max() / ref.abs().max())
        us = t(lambda: [decode_gemv(xin, w, out=o, config=cfg, **kw, **extra) for w in ws_])
        log(dict(n=n, fused=fused, method="triton", block_n=bn, block_k=bk, num_warps=nw, us=us, rel_err=err, gbps=n * D * 2 / us / 1e3))
