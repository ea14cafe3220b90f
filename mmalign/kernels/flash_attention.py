"""FlashAttention-2 forward and backward in Triton for (B, H, N, D) tensors.

The forward pass streams K/V blocks through an online softmax and saves the row log-sum-exp; the backward pass
recomputes the probabilities block by block. dK/dV come from one program per K/V block and dQ from one program
per Q block, so every gradient element is written by exactly one program: no atomics, bitwise deterministic.

Lengths need not be multiples of the block sizes and N_q may differ from N_k; head dims up to 256 are padded to
the next power of two with masked loads. With ``causal=True`` and N_q != N_k the mask is aligned to the
bottom-right corner, as in FlashAttention-2: query i sees key j when j <= i + N_k - N_q, so the last query sees
every key. Query rows that see no key at all (only possible when N_q > N_k) output zeros.

This module imports Triton at the top; call the kernel through ``mmalign.kernels.attention``, which imports this
module only when Triton is available. Set ``TRITON_INTERPRET=1`` before the first import to run the kernels on
CPU tensors (tests do).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
"""Whether these kernels were built for Triton's CPU interpreter (fixed when this module is imported)."""

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _causal_ok(offs_m, offs_n, CAUSAL_SHIFT):
    """Bottom-right causal visibility of key offs_n from query offs_m, with CAUSAL_SHIFT = N_k - N_q."""
    return offs_n[None, :] <= offs_m[:, None] + CAUSAL_SHIFT


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, mask_d, start, end,
    N_K, CAUSAL_SHIFT, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key blocks [start, end) into the running softmax state; MASKED blocks apply tail and causal masks."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = mask_d[None, :]
        if MASKED:  # unmasked blocks lie wholly inside N_K
            kv_mask = kv_mask & (offs_n < N_K)[:, None]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = (offs_n < N_K)[None, :]
            if CAUSAL:
                visible = visible & _causal_ok(offs_m, offs_n, CAUSAL_SHIFT)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if MASKED:
            # A row that has seen no visible key keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
            # Unmasked blocks come first and every row sees all of them, so only masked blocks need this.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N_Q, N_K, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (batch*head, query block); a 1-D grid lifts the 65535 limit on grid axes 1 and 2, and
    # neighbouring programs share K/V in L2. HEAD_DIM is a compile-time constant so that head-dim masks fold
    # away (or stay vector-aligned) and loads vectorize.
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < N_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    causal_shift = N_K - N_Q
    n_full = (N_K // BLOCK_N) * BLOCK_N
    end = N_K
    if CAUSAL:
        # Keys past the last query row's horizon are never visible; blocks wholly below the first row's
        # horizon need no mask.
        end = tl.minimum(N_K, tl.maximum(pid_m * BLOCK_M + BLOCK_M + causal_shift, 0))
        first_row_horizon = tl.maximum(pid_m * BLOCK_M + causal_shift + 1, 0)
        n_full = tl.minimum(n_full, (first_row_horizon // BLOCK_N) * BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                                0, n_full, N_K, causal_shift, qk_scale,
                                False, CAUSAL, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                                n_full, end, N_K, causal_shift, qk_scale,
                                True, CAUSAL, BLOCK_N, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # Empty rows get lse = +inf so the backward's exp2(s - lse) is exactly 0 for them.
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, mask_d, start, end,
    N_K, CAUSAL_SHIFT, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dS @ K over key blocks [start, end) for one query block; the caller applies the softmax scale."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = mask_d[None, :]
        if MASKED:  # unmasked blocks lie wholly inside N_K
            kv_mask = kv_mask & (offs_n < N_K)[:, None]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            visible = (offs_n < N_K)[None, :]
            if CAUSAL:
                visible = visible & _causal_ok(offs_m, offs_n, CAUSAL_SHIFT)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, OUT, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
    H, N_Q, N_K, sm_scale, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Also computes delta = rowsum(dO * O) for its query block and stores it for the dK/dV kernel, which runs
    # after this one; that saves a separate preprocessing launch.
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < N_Q
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_md, other=0.0)
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask_md, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask_md, other=0.0)
    row = pid_bh.to(tl.int64) * N_Q + offs_m
    lse = tl.load(LSE + row, mask=mask_m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row, delta, mask=mask_m)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    causal_shift = N_K - N_Q
    n_full = (N_K // BLOCK_N) * BLOCK_N
    end = N_K
    if CAUSAL:
        end = tl.minimum(N_K, tl.maximum(pid_m * BLOCK_M + BLOCK_M + causal_shift, 0))
        first_row_horizon = tl.maximum(pid_m * BLOCK_M + causal_shift + 1, 0)
        n_full = tl.minimum(n_full, (first_row_horizon // BLOCK_N) * BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                    0, n_full, N_K, causal_shift, qk_scale, False, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                    n_full, end, N_K, causal_shift, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, offs_n, offs_d, mask_d,
    start, end, N_Q, CAUSAL_SHIFT, qk_scale,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dV += P^T dO and dK += dS^T Q over query blocks [start, end) for one key block.

    Works in the transposed orientation (keys along rows). Padded query rows load q = dO = 0 and contribute
    nothing, so only the causal diagonal needs a mask (MASKED).
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < N_Q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=mask_md, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + CAUSAL_SHIFT, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_K, sm_scale, qk_scale, N_Q_BUCKET, N_K_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    num_n = tl.cdiv(N_K, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_nd = (offs_n < N_K)[:, None] & mask_d[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=mask_nd, other=0.0)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * N_Q
    delta_base = DELTA + pid_bh.to(tl.int64) * N_Q
    causal_shift = N_K - N_Q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = 0
    if CAUSAL:
        # Query i sees key j when i >= j - shift: rows before the block's first key see nothing of it, and rows
        # at or after its last key see all of it without a mask.
        start = (tl.maximum(pid_n * BLOCK_N - causal_shift, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - causal_shift, 0), BLOCK_M) * BLOCK_M
        m_full = tl.maximum(m_full, start)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                              offs_n, offs_d, mask_d, start, tl.minimum(m_full, N_Q), N_Q, causal_shift, qk_scale,
                              True, BLOCK_M, DOT_PRECISION)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                          offs_n, offs_d, mask_d, m_full, N_Q, N_Q, causal_shift, qk_scale,
                          False, BLOCK_M, DOT_PRECISION)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)


# ----------------------------------------------------------------------------------------------- host wrappers


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages). BLOCK_M counts query rows and BLOCK_N key rows in every kernel. The lists
# mix big tiles (fast at small head dims) with 8-warp and small tiles that compile for sm_90 without register
# spills at head dims 128 and 160 (checked with ptxas); autotuning picks per shape bucket and head dim.
_FWD_CONFIGS = [_config(*c) for c in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                      (64, 64, 8, 2), (64, 32, 4, 4), (32, 32, 8, 2), (16, 16, 2, 2)]]
_DQ_CONFIGS = [_config(*c) for c in [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 8, 3),
                                     (64, 32, 4, 3), (32, 64, 4, 2), (32, 32, 8, 2), (16, 16, 2, 2)]]
_DKDV_CONFIGS = [_config(*c) for c in [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 8, 2),
                                       (32, 64, 4, 3), (32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 2, 2)]]
_INTERPRETER_CONFIG = _config(32, 32, 4, 1)
_TUNING_KEY = ["N_Q_BUCKET", "N_K_BUCKET", "HEAD_DIM", "CAUSAL"]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop blocks far longer than the sequences, and big tiles at head dim 256 that cannot fit on chip.

    The interpreter gets one fixed config: it cannot time kernels, and 32x32 blocks keep tests quick while
    still splitting test sequences into several blocks with ragged tails.
    """
    if INTERPRETED:
        return [_INTERPRETER_CONFIG]
    args = {**named_args, **kwargs}
    max_m, max_n = max(16, args["N_Q_BUCKET"]), max(16, args["N_K_BUCKET"])
    wide = args["BLOCK_D"] > 128
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n
        and not (wide and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _tuned(configs: list[triton.Config]):
    # cache_results keeps the timings on disk (Triton's cache), so later processes skip the tuning runs.
    return triton.autotune(configs=configs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_configs},
                           cache_results=True)


_attn_fwd = _tuned(_FWD_CONFIGS)(_attn_fwd_kernel)
_attn_bwd_dq = _tuned(_DQ_CONFIGS)(_attn_bwd_dq_kernel)
_attn_bwd_dkdv = _tuned(_DKDV_CONFIGS)(_attn_bwd_dkdv_kernel)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1; other strides are passed through, so most views need no copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _shape_args(q: torch.Tensor, k: torch.Tensor) -> dict:
    n_q, n_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    return {
        "H": q.shape[1], "N_Q": n_q, "N_K": n_k, "HEAD_DIM": head_dim,
        "N_Q_BUCKET": triton.next_power_of_2(n_q), "N_K_BUCKET": triton.next_power_of_2(n_k),
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        # fp32 inputs are for exactness (tests, references): keep full fp32 products instead of TF32.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    batch, heads, n_q, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    with _device_guard(q):
        _attn_fwd[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)](
            q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            qk_scale=scale * _LOG2E, CAUSAL=causal, **_shape_args(q, k),
        )
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, scale: float):
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    shape_args = _shape_args(q, k)
    with _device_guard(q):
        _attn_bwd_dq[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)](
            q, k, v, o, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            *_strides(do), *_strides(dq),
            sm_scale=scale, qk_scale=scale * _LOG2E, CAUSAL=causal, **shape_args,
        )
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]) * batch * heads,)](
            q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dk), *_strides(dv),
            sm_scale=scale, qk_scale=scale * _LOG2E, CAUSAL=causal, **shape_args,
        )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------- autograd function


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable fused attention; saves only Q, K, V, O and the log-sum-exp (O(N) extra memory)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_last_stride(do), q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * Q K^T) V for q (B, H, N_q, D), k and v (B, H, N_k, D); inputs are assumed validated.

    Use ``mmalign.kernels.attention``, which checks shapes, dtypes and devices and picks a backend.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, causal, scale)
