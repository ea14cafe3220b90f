"""A reward's pixel gradient against a central finite difference, shared by the reward tests."""

import pytest
import torch


def assert_pixel_gradient(total, batch: int, seed: int, size: int = 32) -> None:
    """``total(pixels) -> scalar`` differentiated along a random direction at random fp64 pixels in [0.25, 0.75],
    against a central difference. Scores are float32 (the reward contract), so the step is large enough to keep
    their rounding out of the difference and the tolerance is 0.5%."""
    generator = torch.Generator().manual_seed(seed)
    pixels = 0.25 + 0.5 * torch.rand(batch, 3, size, size, generator=generator, dtype=torch.float64)
    direction = torch.randn(pixels.shape, generator=generator, dtype=torch.float64)
    pixels.requires_grad_(True)
    (grad,) = torch.autograd.grad(total(pixels), pixels)
    eps = 1e-3
    with torch.no_grad():
        numeric = (total(pixels + eps * direction) - total(pixels - eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=5e-3)
    assert float(grad.abs().sum()) > 0
