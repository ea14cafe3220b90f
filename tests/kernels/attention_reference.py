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
