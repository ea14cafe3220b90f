"""Plain-PyTorch attention references shared by the kernel tests (imported by module name: pytest puts this
folder on sys.path, as tests/ has no __init__.py)."""

import torch


def visible(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bottom-right causal mask: query i sees key j when j <= i + n_k - n_q."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


def reference_attention(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention written out; rows that see no key are zero, as the kernel defines them."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(~visible(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


def rounding_error_std(
    q, k, v, dout, causal: bool, scale: float, unit_roundoff: float
) -> dict[str, torch.Tensor]:
    """Standard deviation of the rounding error that FlashAttention-2's algorithm accumulates when it computes in
    a precision of unit roundoff ``u`` (2**-24 for fp32), elementwise for "out", "dq", "dk" and "dv".

    Linearised propagation (computed in fp64 from exact intermediates) under the usual probabilistic model: each
    rounding adds an independent error of at most u times its result, so variances add and a length-n dot product
    sum_k a_k b_k has variance about u^2 n sum_k (a_k b_k)^2 (the partial sums each round once). It follows the
    kernel's steps: logits S = scale Q K^T (length D), the log-sum-exp, P = exp(S - L) recomputed in the backward,
    O = P V (length N_k), delta = rowsum(dO * O) (length D, inheriting O's error), dP = dO V^T, dS = P (dP - delta),
    dQ = scale dS K (length N_k), dK = scale dS^T Q and dV = P^T dO (length N_q). The error of P is amplified in
    dS by |dP - delta|, which is why dK and dQ err more than O: a bound that only knows PyTorch's error (whose
    backward reuses the saved softmax instead) misses it. exp2 and log2 get 4u each (GPU approximations).
    """
    q, k, v, do = (t.double() for t in (q, k, v, dout))
    u2 = unit_roundoff**2
    n_q, n_k, head_dim = q.shape[2], k.shape[2], q.shape[3]

    def sq(t):
        return t * t

    def tr(t):
        return t.transpose(-1, -2)

    s = q @ tr(k) * scale
    if causal:
        s = s.masked_fill(~visible(n_q, n_k, q.device), float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse).nan_to_num(0.0)  # rows that see no key: P = 0, so no error is allowed there
    s, lse = s.nan_to_num(0.0, 0.0, 0.0), lse.nan_to_num(0.0, 0.0, 0.0)
    o = p @ v
    var_s = u2 * (head_dim * scale**2 * (sq(q) @ tr(sq(k))) + sq(s))
    # relative error of P: the logit's own, the log-sum-exp's (the P-weighted logit errors, the length-N_k sum
    # and log2 of it), the subtraction S - L and exp2
    var_p = var_s + (sq(p) * var_s).sum(-1, keepdim=True) + u2 * (n_k + 16 + sq(lse) + sq(s - lse) + 16)
    var_o = (sq(p) * var_p) @ sq(v) + u2 * n_k * (sq(p) @ sq(v)) + u2 * sq(o)
    var_dv = tr(sq(p) * var_p) @ sq(do) + u2 * n_q * (tr(sq(p)) @ sq(do))
    g = do @ tr(v) - (do * o).sum(-1, keepdim=True)  # dP - delta
    var_g = (
        u2 * head_dim * (sq(do) @ tr(sq(v)))
        + (sq(do) * var_o).sum(-1, keepdim=True)
        + u2 * head_dim * sq(do * o).sum(-1, keepdim=True)
        + u2 * sq(g)
    )
    ds = p * g
    var_ds = sq(p) * (var_p * sq(g) + var_g) + u2 * sq(ds)
    dq, dk = ds @ k * scale, tr(ds) @ q * scale
    var_dq = scale**2 * (var_ds @ sq(k) + u2 * n_k * (sq(ds) @ sq(k))) + u2 * sq(dq)
    var_dk = scale**2 * (tr(var_ds) @ sq(q) + u2 * n_q * (tr(sq(ds)) @ sq(q))) + u2 * sq(dk)
    return {
        name: var.sqrt() for name, var in (("out", var_o), ("dq", var_dq), ("dk", var_dk), ("dv", var_dv))
    }
