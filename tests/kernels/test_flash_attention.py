"""The Triton kernel against an fp64 reference, with FlashAttention's rule: its error on the output and on dQ, dK,
dV may be at most twice PyTorch's own attention error in the same precision, plus a tiny floor.

Under the interpreter (the default on CPU) fp32 and fp16 are tested; bf16 runs only with compiled Triton on a
GPU, because the interpreter's ``tl.dot`` computes bf16 products wrongly. Shapes are small because the
interpreter takes a fraction of a second per kernel launch; the 32x32 interpreter blocks still split them
into several blocks with ragged tails.
"""

import pytest
import torch
import torch.nn.functional as F
from attention_reference import reference_attention, visible

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (batch, heads, N_q, N_k, head dim, causal)
SHAPES = [
    pytest.param(1, 2, 33, 77, 40, False, id="cross-33x77-d40"),
    pytest.param(1, 2, 33, 77, 40, True, id="causal-33x77-d40"),
    pytest.param(2, 1, 17, 17, 72, True, id="causal-17-d72"),
    pytest.param(1, 1, 50, 20, 80, True, id="causal-50x20-d80-empty-rows"),
    pytest.param(1, 1, 40, 24, 160, False, id="cross-40x24-d160"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


def pytorch_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    mask = visible(q.shape[2], k.shape[2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def output_and_grads(fn, q, k, v, grad_out, causal, scale):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal, scale)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def make_inputs(batch, heads, n_q, n_k, head_dim, device, dtype, layout="bnhd"):
    """q, k, v, dout as (B, H, N, D) views; "bnhd" is the strided layout diffusers and transformers produce."""

    def tensor(n):
        if layout == "bnhd":
            return torch.randn(batch, n, heads, head_dim).transpose(1, 2).to(device, dtype)
        if layout == "bhdn":  # head dim not unit-stride: the wrapper must copy
            return torch.randn(batch, heads, head_dim, n).transpose(2, 3).to(device, dtype)
        return torch.randn(batch, heads, n, head_dim).to(device, dtype)

    return tensor(n_q), tensor(n_k), tensor(n_k), tensor(n_q)


def assert_within_pytorch_error(flash, inputs, causal, scale, dtype):
    q, k, v, dout = inputs
    ref = output_and_grads(reference_attention, *(t.double() for t in inputs), causal, scale)
    ours = output_and_grads(lambda *a: flash.flash_attention(*a[:3], causal=a[3], scale=a[4]), *inputs, causal, scale)
    theirs = output_and_grads(pytorch_attention, *inputs, causal, scale)
    for name in ref:
        assert ours[name].dtype == dtype and ours[name].shape == ref[name].shape
        err = (ours[name].double() - ref[name]).abs().max().item()
        base = (theirs[name].double() - ref[name]).abs().max().item()
        assert err <= 2 * base + FLOOR[dtype], (
            f"{name}: kernel error {err:.3g} exceeds 2 x PyTorch's {base:.3g} + {FLOOR[dtype]:g} ({dtype})"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "heads", "n_q", "n_k", "head_dim", "causal"), SHAPES)
def test_matches_reference(flash, device, batch, heads, n_q, n_k, head_dim, causal, dtype):
    if dtype == torch.bfloat16 and flash.INTERPRETED:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 is tested on a GPU")
    torch.manual_seed(0)
    inputs = make_inputs(batch, heads, n_q, n_k, head_dim, device, dtype)
    assert_within_pytorch_error(flash, inputs, causal, head_dim**-0.5, dtype)


@pytest.mark.parametrize("layout", ["bhnd", "bhdn"])
def test_layouts_and_custom_scale(flash, device, layout):
    torch.manual_seed(1)
    inputs = make_inputs(2, 2, 20, 45, 64, device, torch.float32, layout)
    assert_within_pytorch_error(flash, inputs, False, 0.3, torch.float32)


def test_rows_without_keys_are_zero(flash, device):
    q, k, v, _ = make_inputs(1, 1, 40, 8, 16, device, torch.float32)
    out = flash.flash_attention(q, k, v, causal=True)
    assert torch.all(out[:, :, :32] == 0) and torch.all(out[:, :, 32:].abs().sum(-1) > 0)


@pytest.mark.gpu
def test_backward_is_deterministic(flash, device):
    if flash.INTERPRETED:
        pytest.skip("determinism matters for the compiled kernel")
    torch.manual_seed(2)
    inputs = make_inputs(2, 4, 1000, 1000, 64, device, torch.bfloat16)
    first = output_and_grads(lambda *a: flash.flash_attention(*a[:3], causal=a[3]), *inputs, True, None)
    second = output_and_grads(lambda *a: flash.flash_attention(*a[:3], causal=a[3]), *inputs, True, None)
    for name in first:
        assert torch.equal(first[name], second[name]), name
