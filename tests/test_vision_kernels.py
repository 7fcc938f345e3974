"""Tests of flexvlm_env/model/vision_kernels.py: the reference is the ViT MLP's activation, dispatch
(autograd keeps the reference), argument errors, the Triton kernel in Triton's interpreter (subprocess)
and, with a GPU, bit-identical to the reference in every float dtype and inside the vision tower."""
from __future__ import annotations

import pytest
import torch
from _interpret import run_interpret_check

from flexvlm_env.model.args import VisionArgs
from flexvlm_env.model.vision import ViTMLP
from flexvlm_env.model.vision_kernels import quick_gelu, quick_gelu_auto, quick_gelu_reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_reference_is_clip_quick_gelu():
    h = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    expected = h / (1 + torch.exp(-1.702 * h))
    torch.testing.assert_close(quick_gelu_reference(h), expected, rtol=1e-12, atol=1e-12)


def test_vit_mlp_is_w2_of_quick_gelu_of_w1():
    torch.manual_seed(0)
    mlp = ViTMLP(VisionArgs(width=32, mlp_dim=64, n_heads=2, head_dim=16))
    x = torch.randn(2, 5, 32)
    h = mlp.w1(x)
    torch.testing.assert_close(mlp(x), mlp.w2(h * torch.sigmoid(1.702 * h)), rtol=0, atol=0)


def test_auto_dispatch_keeps_autograd():
    h = torch.randn(4, 8, requires_grad=True)
    out = quick_gelu_auto(h)  # CPU: the reference, differentiable
    out.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    with pytest.raises(ValueError, match="no backward"):
        quick_gelu_auto(h, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        quick_gelu_auto(h.detach(), impl="cuda")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="h must be one of"):
        quick_gelu(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="h must be one of"):
        quick_gelu(torch.ones(3, dtype=torch.int32))


def test_triton_kernel_in_interpreter():
    run_interpret_check("_vision_interpret_check.py")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quick_gelu_is_bit_identical_on_gpu(dtype):
    torch.manual_seed(0)
    # The ViT's hidden shape at 13 views (CLIP ViT-L: 577 tokens, 4096 wide), a tail, and the sigmoid's tails.
    for h in ((torch.randn(13, 577, 4096, device="cuda") * 3).to(dtype),
              (torch.randn(3, 1001, device="cuda") * 3).to(dtype),
              torch.linspace(-90, 90, 20011, device="cuda").to(dtype)):
        out = quick_gelu_auto(h)
        ref = quick_gelu_reference(h)
        assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {h.numel()} elements differ"
    with pytest.raises(ValueError, match="out must be a contiguous"):
        quick_gelu(h, out=torch.empty(3, device="cuda", dtype=dtype))
