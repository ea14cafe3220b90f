"""Fused attention kernels (Triton) with PyTorch fallbacks, and the code that installs them into models.

``attention`` picks a backend per call; ``install`` routes a diffusers or transformers model through it.
Importing this package never imports Triton: the kernel module loads on the first call that needs it.
"""

from mmalign.kernels.dispatch import BACKENDS, Backend, attention, available_backends, resolve_backend
from mmalign.kernels.install import InstallReport, install
from mmalign.kernels.processors import AttentionProcessor, FluxAttentionProcessor, JointAttentionProcessor

__all__ = [
    "BACKENDS",
    "AttentionProcessor",
    "Backend",
    "FluxAttentionProcessor",
    "InstallReport",
    "JointAttentionProcessor",
    "attention",
    "available_backends",
    "install",
    "resolve_backend",
]
