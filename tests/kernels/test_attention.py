"""The public dispatcher: input checks with clear messages, backend choice, and the SDPA backend's semantics."""

import importlib.util

import pytest
import torch
from attention_reference import reference_attention

import mmalign.kernels.dispatch as dispatch
from mmalign.kernels import attention, available_backends, resolve_backend


def qkv(n_q=5, n_k=7, head_dim=8, dtype=torch.float32, batch=2, heads=3):
    q = torch.randn(batch, heads, n_q, head_dim, dtype=dtype)
    return q, torch.randn(batch, heads, n_k, head_dim, dtype=dtype), torch.randn(batch, heads, n_k, head_dim, dtype=dtype)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda q, k, v: (q[0], k, v), r"q must have 4 dims \(B, H, N, D\); got shape \(3, 5, 8\)"),
        (lambda q, k, v: (q, k[:1], v[:1]), r"k must have the batch size of q \(2, dim 0"),
        (lambda q, k, v: (q, k[:, :2], v[:, :2]), r"k must have the head count of q \(3, dim 1"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), r"k must have the head dim of q \(8, dim 3"),
        (lambda q, k, v: (q, k, v[:, :, :3]), r"v must have the shape of k \(2, 3, 7, 8\); got \(2, 3, 3, 8\)"),
        (lambda q, k, v: (q, k.half(), v), r"k must have the dtype of q \(torch.float32\); got torch.float16"),
        (lambda q, k, v: (q, k, v.to("meta")), r"v must be on the device of q \(cpu\); got meta"),
        (lambda q, k, v: (q.long(), k, v), r"q must be a floating-point tensor; got dtype torch.int64"),
        (lambda q, k, v: (q[:, :, :0], k, v), r"q must hold at least one token"),
    ],
    ids=["rank", "batch", "heads", "head-dim", "v-shape", "dtype", "device", "integer", "empty"],
)
def test_bad_inputs_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        attention(*make(*qkv()))


def test_non_tensor_is_a_type_error():
    q, k, _ = qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor; got list"):
        attention(q, k, [1.0])


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*'flash3'"):
        attention(*qkv(), backend="flash3")


def test_triton_backend_says_why_it_cannot_run(monkeypatch):
    q, k, v = qkv(head_dim=512)
    if dispatch._flash_module() is not None:
        with pytest.raises(ValueError, match=r"backend='triton' cannot run here: head dim 512 exceeds 256"):
            attention(q, k, v, backend="triton")
    monkeypatch.setattr(dispatch, "_flash_module", lambda: None)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: triton is not installed"):
        attention(*qkv(), backend="triton")
    assert resolve_backend(qkv()[0], "auto") == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_backend_missing():
    with pytest.raises(ValueError, match=r"backend='xformers' cannot run here: xformers is not installed"):
        attention(*qkv(), backend="xformers")


def test_auto_uses_sdpa_on_cpu():
    # Even under the interpreter: "auto" means compiled Triton on a GPU, never the slow interpreter.
    assert resolve_backend(qkv()[0], "auto") == "sdpa"
    assert "sdpa" in available_backends("cpu")


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(6, 11, False), (6, 11, True), (11, 6, True), (9, 9, True)])
def test_sdpa_backend_matches_reference(n_q, n_k, causal):
    """Causal masks align bottom-right for every backend, unlike SDPA's own is_causal when N_q != N_k."""
    q, k, v = (t.double().requires_grad_() for t in qkv(n_q, n_k))
    out = attention(q, k, v, causal=causal, scale=0.5, backend="sdpa")
    ref = reference_attention(q, k, v, causal=causal, scale=0.5)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for name, got, expected in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, expected, msg=lambda m, name=name: f"d{name}: {m}")


def test_triton_backend_through_dispatcher(device):
    q, k, v = (t.to(device) for t in qkv(13, 29, head_dim=24))
    assert "triton" in available_backends(device, torch.float32)
    out = attention(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
