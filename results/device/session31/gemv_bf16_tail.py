"""Session 31, on the sandbox CPU (not the device): how far the decode GEMV kernel is from float64 in bfloat16 in the
Triton interpreter, over 300 random draws of its smallest checked case (5 outputs, K=33, residual add + RMSNorm) and
a larger one; the torch reference beside it. Run: TRITON_INTERPRET=1 python results/device/session31/gemv_bf16_tail.py
(from the repository root; about 3.5 minutes). Output of the run: gemv_bf16_tail.txt."""
import sys
sys.path.insert(0, "tests")
import torch
from _interpret import BF16, nonzero_randn, rel_err
from flexvlm_env.model.decode_gemv import GemvConfig, decode_gemv, decode_gemv_reference
EPS = 1e-5
def f64(x, weight, norm_weight):
    h = x.double()
    h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + EPS) * norm_weight.double()
    return h @ weight.double().T
torch.manual_seed(0)
cfg = GemvConfig(block_n=4, block_k=16, num_warps=1)
ker, ref_errs = [], []
for n, k in ((5, 33), (96, 200)):
    ker, ref_errs = [], []
    for i in range(300):
        x = nonzero_randn(1, k).to(BF16); w = (torch.randn(n, k) * k ** -0.5).to(BF16)
        r = nonzero_randn(1, k).to(BF16); nw = nonzero_randn(k).to(BF16)
        ref, ref_res = decode_gemv_reference(x, w, residual=r, norm_weight=nw, eps=EPS)
        r64 = f64(ref_res, w, nw)
        got, _ = decode_gemv(x, w, residual=r, norm_weight=nw, eps=EPS, config=cfg)
        ker.append(rel_err(got, r64)); ref_errs.append(rel_err(ref, r64))
    ker = torch.tensor(ker); rr = torch.tensor(ref_errs)
    print(n, k, "kernel >1e-2: %.3f  max %.4f p99 %.4f | reference >1e-2: %.3f max %.4f" % ((ker > 1e-2).float().mean(), ker.max(), ker.quantile(0.99), (rr > 1e-2).float().mean(), rr.max()))
