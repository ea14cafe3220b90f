"""The Triton kernel against an fp64 reference.

fp16 and bf16 follow FlashAttention's rule: the kernel's error on the output and on dQ, dK, dV may be at most
twice PyTorch's own attention error in the same precision, plus a tiny floor. There PyTorch's error is dominated
by rounding to the 16-bit format and is a stable yardstick.

fp32 is held to a bound derived from the algorithm instead (``rounding_error_std`` in attention_reference.py):
every element's error must stay within ``SIGMAS`` standard deviations of the rounding error that FlashAttention-2's
sequence of fp32 operations accumulates. PyTorch's fp32 error is no yardstick: which SDPA backend runs depends on
the layout (the CPU flash kernel needs a unit-stride head dim, otherwise the math path runs), and its backward
reuses the saved softmax, whereas FlashAttention recomputes P from the log-sum-exp, whose error the backward
amplifies by |dP - delta|. Measured on 20x45 keys, D=64, scale 0.3: PyTorch's dK error is 8.9e-6 through its CPU
flash kernel and 2.4e-6 through the math path on the same tensors, while the kernel's runs 2e-6..1.2e-5 from seed to
seed, 2-5x over the math path's on 4 seeds in 10.

Under the interpreter (the default on CPU) fp32 and fp16 are tested; bf16 runs only with compiled Triton on a
GPU, because the interpreter's ``tl.dot`` computes bf16 products wrongly. Shapes are small because the
interpreter takes a fraction of a second per kernel launch; the 32x32 interpreter blocks still split them
into several blocks with ragged tails.
"""

import pytest
import torch
import torch.nn.functional as F
from attention_reference import reference_attention, rounding_error_std, visible

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
FP32_UNIT_ROUNDOFF = 2.0**-24
# Over 30 seeds of each shape here and of larger, sharper ones (causal 257x300 keys at scale 0.5, 64x512 at scale
# 1), with 1 and 2 threads, the kernel's worst element sat at 2.2 sigma; an error of 1e-4 relative to the largest
# gradient element is 10-130 sigma.
SIGMAS = 6.0

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


def tolerance_failures(ours, ref, theirs, inputs, causal, scale, dtype) -> list[str]:
    """What in ``ours`` (out, dq, dk, dv) errs beyond the tolerance of its dtype; empty when all is within."""
    failures = []
    std = rounding_error_std(*inputs, causal, scale, FP32_UNIT_ROUNDOFF) if dtype == torch.float32 else None
    for name in ref:
        err = (ours[name].double() - ref[name]).abs()
        if std is not None:
            # an fp32 rounding floor for elements whose estimated error vanishes (rows that see no key are exact)
            allowed = SIGMAS * std[name] + FP32_UNIT_ROUNDOFF * ref[name].abs().max()
            worst = (err / allowed).flatten().argmax()
            if err.flatten()[worst] > allowed.flatten()[worst]:
                failures.append(
                    f"{name}: kernel error {err.flatten()[worst].item():.3g} at element {worst.item()} exceeds "
                    f"{SIGMAS:g} sigma of fp32 rounding ({allowed.flatten()[worst].item():.3g}); worst error "
                    f"{err.max().item():.3g}, PyTorch's {(theirs[name].double() - ref[name]).abs().max().item():.3g}"
                )
        else:
            base = (theirs[name].double() - ref[name]).abs().max().item()
            if err.max().item() > 2 * base + FLOOR[dtype]:
                failures.append(
                    f"{name}: kernel error {err.max().item():.3g} exceeds 2 x PyTorch's {base:.3g} + {FLOOR[dtype]:g}"
                )
    return failures


def kernel_reference_and_pytorch(flash, inputs, causal, scale):
    ref = output_and_grads(reference_attention, *(t.double() for t in inputs), causal, scale)
    ours = output_and_grads(lambda *a: flash.flash_attention(*a[:3], causal=a[3], scale=a[4]), *inputs, causal, scale)
    theirs = output_and_grads(pytorch_attention, *inputs, causal, scale)
    return ours, ref, theirs


def assert_within_tolerance(flash, inputs, causal, scale, dtype):
    ours, ref, theirs = kernel_reference_and_pytorch(flash, inputs, causal, scale)
    for name in ref:
        assert ours[name].dtype == dtype and ours[name].shape == ref[name].shape
    failures = tolerance_failures(ours, ref, theirs, inputs, causal, scale, dtype)
    assert not failures, f"{dtype}: " + "; ".join(failures)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "heads", "n_q", "n_k", "head_dim", "causal"), SHAPES)
def test_matches_reference(flash, device, batch, heads, n_q, n_k, head_dim, causal, dtype):
    if dtype == torch.bfloat16 and flash.INTERPRETED:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 is tested on a GPU")
    torch.manual_seed(0)
    inputs = make_inputs(batch, heads, n_q, n_k, head_dim, device, dtype)
    assert_within_tolerance(flash, inputs, causal, head_dim**-0.5, dtype)


@pytest.mark.parametrize("layout", ["bhnd", "bhdn"])
def test_layouts_and_custom_scale(flash, device, layout):
    torch.manual_seed(1)
    inputs = make_inputs(2, 2, 20, 45, 64, device, torch.float32, layout)
    assert_within_tolerance(flash, inputs, False, 0.3, torch.float32)


@pytest.mark.parametrize("seed", range(4))
def test_fp32_tolerance_holds_across_seeds(flash, device, seed):
    """The fp32 bound does not hinge on a lucky draw: the shape and scale that failed the old rule on 4 seeds in 10."""
    torch.manual_seed(100 + seed)
    inputs = make_inputs(2, 2, 20, 45, 64, device, torch.float32, "bhdn")
    assert_within_tolerance(flash, inputs, False, 0.3, torch.float32)


@pytest.mark.parametrize("name", ["out", "dq", "dk", "dv"])
@pytest.mark.parametrize("shape", [(2, 2, 20, 45, 64, False, 0.3), (1, 2, 33, 77, 40, True, 40**-0.5)],
                         ids=["layouts-20x45-d64", "causal-33x77-d40"])
def test_fp32_tolerance_catches_small_errors(flash, device, shape, name):
    """A kernel off by 1e-4 relative (a TF32 product or a bf16 rounding errs ~10x more) fails the fp32 check."""
    *dims, causal, scale = shape
    torch.manual_seed(1)
    inputs = make_inputs(*dims, device, torch.float32, "bhdn")
    ours, ref, theirs = kernel_reference_and_pytorch(flash, inputs, causal, scale)
    assert not tolerance_failures(ours, ref, theirs, inputs, causal, scale, torch.float32)
    bumped = dict(ours, **{name: ours[name].clone(memory_format=torch.contiguous_format)})
    bumped[name].view(-1)[ref[name].abs().argmax()] *= 1 + 1e-4  # the largest element, relative 1e-4
    scaled = dict(ours, **{name: ours[name] * (1 + 1e-4)})  # every element, relative 1e-4
    for wrong in (bumped, scaled):
        failures = tolerance_failures(wrong, ref, theirs, inputs, causal, scale, torch.float32)
        assert [f.split(":")[0] for f in failures] == [name], failures


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
