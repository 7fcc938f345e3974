"""Tests of flexvlm_env/model/vision_kernels.py: the references are what the ViT computes (its MLP's
activation; a block's residual add and the next LayerNorm, and the fused block loop equals the blocks as
written), dispatch (autograd keeps the references), argument errors, the Triton kernels in Triton's
interpreter (subprocess) and, with a GPU, quick_gelu bit-identical to its reference in every float dtype
and the whole tower within bf16 rounding of the plain one."""
from __future__ import annotations

import pytest
import torch
from _interpret import run_interpret_check

import flexvlm_env.model.vision as vision
from flexvlm_env.model.args import VisionArgs
from flexvlm_env.model.vision import VisionTransformer, ViTBlock, ViTMLP
from flexvlm_env.model.vision_kernels import (
    MAX_WIDTH,
    add_layer_norm,
    add_layer_norm_auto,
    add_layer_norm_reference,
    quick_gelu,
    quick_gelu_auto,
    quick_gelu_reference,
)

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


SMALL = VisionArgs(width=32, n_layers=4, n_heads=2, head_dim=16, mlp_dim=64, vit_layers=(-1, -3), crop_px=56, margin_patches=0)


def _random_tower(seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    vit = VisionTransformer(SMALL)
    with torch.no_grad():
        for p in vit.parameters():  # LayerNorms start at weight 1, bias 0: make them matter
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return vit.to(device, dtype).eval()


def test_add_layer_norm_reference_is_the_block_add_and_next_norm():
    torch.manual_seed(0)
    block = ViTBlock(SMALL)
    x, update = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    normed, new_x = add_layer_norm_reference(update, x, block.ffn_norm.weight, block.ffn_norm.bias, block.ffn_norm.eps)
    assert torch.equal(new_x, x + update) and torch.equal(normed, block.ffn_norm(x + update))


def test_fused_block_loop_equals_the_blocks(monkeypatch):
    # On the CPU the fused loop runs the references: the same operations in the same order, so the
    # restructured loop (each add paired with the LayerNorm after it, across blocks) must be bit-identical.
    vit = _random_tower()
    patches = torch.randn(3, SMALL.patches_per_crop, SMALL.patch_dim)
    with torch.no_grad():
        plain = vit(patches)
        monkeypatch.setattr(vision, "fused_add_norm_ok", lambda x, weight: True)
        fused = vit(patches)
    assert torch.equal(plain, fused)


def test_add_layer_norm_dispatch_and_bad_arguments():
    norm = torch.nn.LayerNorm(8)
    x, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    normed, _ = add_layer_norm_auto(x, r, norm)  # CPU: the reference, differentiable
    normed.sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="no backward"):
        add_layer_norm_auto(x, r, norm, impl="triton")
    with pytest.raises(ValueError, match="elementwise-affine"):
        add_layer_norm_auto(x, r, torch.nn.LayerNorm(8, bias=False))
    with pytest.raises(ValueError, match="residual must match"):
        add_layer_norm(torch.ones(3, 8), torch.ones(3, 9), norm.weight, norm.bias, 1e-5)
    with pytest.raises(ValueError, match="bias must be"):
        add_layer_norm(torch.ones(3, 8), torch.ones(3, 8), norm.weight, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="x must be one of"):
        add_layer_norm(torch.ones(3, 8, dtype=torch.float64), torch.ones(3, 8, dtype=torch.float64), norm.weight,
                       norm.bias, 1e-5)


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


@pytest.mark.gpu
@gpu
def test_vision_tower_fused_equals_plain_on_gpu(monkeypatch):
    fused_add_norm_ok = vision.fused_add_norm_ok  # before the monkeypatch below
    torch.manual_seed(0)
    x, r = (torch.randn(13, 577, 1024, device="cuda") * 2).bfloat16(), torch.randn(13, 577, 1024, device="cuda").bfloat16()
    norm = torch.nn.LayerNorm(1024, device="cuda").bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
        normed, new_r = add_layer_norm_auto(x, r, norm)
        ref, ref_r = add_layer_norm_reference(x, r, norm.weight, norm.bias, norm.eps)
    assert torch.equal(new_r, ref_r)  # the add rounds as torch's
    torch.testing.assert_close(normed, ref, atol=2e-2, rtol=2e-2)  # statistics summed in another order
    vit = _random_tower(dtype=torch.bfloat16, device="cuda")
    patches = torch.randn(3, SMALL.patches_per_crop, SMALL.patch_dim, device="cuda").bfloat16()
    with torch.no_grad():
        fused = vit(patches)
        monkeypatch.setattr(vision, "fused_add_norm_ok", lambda x, weight: False)
        plain = vit(patches)
    torch.testing.assert_close(fused, plain, atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        assert fused_add_norm_ok(patches, vit.pre_ln.weight)
        assert not fused_add_norm_ok(torch.empty(2, MAX_WIDTH + 1, device="cuda"), vit.pre_ln.weight)  # too wide
    assert not fused_add_norm_ok(patches, vit.pre_ln.weight)  # grad enabled and the weights require it
