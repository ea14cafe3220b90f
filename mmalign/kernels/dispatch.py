"""The public attention op: validates inputs, picks a backend per call and runs it.

Backends: ``"triton"`` (mmalign's fused FlashAttention-2 kernel), ``"sdpa"`` (PyTorch's
``scaled_dot_product_attention``, which runs everywhere) and ``"xformers"`` (when installed, CUDA only).
``"auto"`` takes Triton on a CUDA GPU of compute capability >= 8.0 for fp16/bf16 inputs with head dim <= 256,
and SDPA otherwise. All backends share one causal convention: with N_q != N_k the mask is aligned to the
bottom-right corner (query i sees key j when j <= i + N_k - N_q), as in FlashAttention-2.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "triton", "sdpa", "xformers"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "sdpa", "xformers")
_AUTO_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_module() -> ModuleType | None:
    """The Triton kernel module, or None when Triton cannot be imported (the kernel module imports it eagerly)."""
    try:
        return importlib.import_module("mmalign.kernels.flash_attention")
    except ImportError:
        return None


def _triton_problem(q: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None when it can."""
    flash = _flash_module()
    if flash is None:
        return "triton is not installed (pip install 'mmalign[kernels]')"
    if q.dtype not in flash.SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (expected float16, bfloat16 or float32)"
    if q.shape[-1] > flash.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} exceeds {flash.MAX_HEAD_DIM}"
    if flash.INTERPRETED:
        return None
    if not q.is_cuda:
        return f"tensors are on {q.device}; the kernel needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"GPU compute capability {major}.{minor} is below 8.0"
    return None


def _xformers_problem(q: torch.Tensor) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'mmalign[xformers]')"
    if not q.is_cuda:
        return f"tensors are on {q.device}; xformers needs a CUDA GPU"
    return None


def resolve_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The concrete backend that ``attention`` would run for ``q``; raises ValueError when ``backend`` cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        flash = _flash_module()
        compiled = flash is not None and not flash.INTERPRETED
        fits = q.is_cuda and q.dtype in _AUTO_DTYPES and _triton_problem(q) is None
        return "triton" if compiled and fits else "sdpa"
    problem = {"triton": _triton_problem, "xformers": _xformers_problem}.get(backend, lambda _: None)(q)
    if problem is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {problem}; use backend='auto' or 'sdpa'")
    return backend


def available_backends(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Backends that can run (B, H, N, 64) inputs of ``dtype`` on ``device``, for benchmarks and diagnostics."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["sdpa"]
    probe = torch.empty((1, 1, 1, 64), dtype=dtype, device=device)
    checks = {"triton": _triton_problem, "sdpa": lambda _: None, "xformers": _xformers_problem}
    return [name for name, problem in checks.items() if problem(probe) is None]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, N, D); got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
        if t.shape[2] == 0:
            raise ValueError(f"{name} must hold at least one token; got shape {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}; got {tuple(v.shape)}")
    for axis, what in ((0, "batch size"), (1, "head count"), (3, "head dim")):
        if k.shape[axis] != q.shape[axis]:
            raise ValueError(
                f"k must have the {what} of q ({q.shape[axis]}, dim {axis} of (B, H, N, D)); got {k.shape[axis]}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}); got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}); got {t.device}")


def _sdpa(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    n_q, n_k = q.shape[2], k.shape[2]
    if causal and n_q != n_k:
        # SDPA's is_causal aligns top-left; build the bottom-right mask explicitly.
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _xformers(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    xops = importlib.import_module("xformers.ops")
    bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    # xformers works in (B, N, H, D); the transposes are views.
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def _triton(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    return _flash_module().flash_attention(q, k, v, causal=causal, scale=scale)


_RUNNERS = {"triton": _triton, "sdpa": _sdpa, "xformers": _xformers}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """softmax(scale * Q K^T) V over (B, H, N, D) tensors; returns (B, H, N_q, D) in the input dtype.

    q is (B, H, N_q, D); k and v are (B, H, N_k, D), with the dtype and device of q. ``scale`` defaults to
    1/sqrt(D). ``causal`` masks keys after each query, aligned bottom-right when N_q != N_k. Differentiable in
    q, k and v with every backend. Grouped-query layouts must repeat k/v heads before the call.
    """
    _check_inputs(q, k, v)
    return _RUNNERS[resolve_backend(q, backend)](q, k, v, causal, scale)
