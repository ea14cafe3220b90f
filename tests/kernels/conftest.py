"""Shared setup for the kernel tests.

Triton decides between compiling and interpreting when a kernel is decorated, so TRITON_INTERPRET must be set
before ``mmalign.kernels.flash_attention`` is imported: pytest imports this conftest at collection, before any
test module. Other test packages never import Triton, so setting it here does not change them when the whole
suite runs in one process. On a GPU, run ``TRITON_INTERPRET=0 pytest tests/kernels`` to test the compiled
kernels on CUDA tensors (bf16 included).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mmalign.kernels.dispatch import _flash_module  # noqa: E402


@pytest.fixture(scope="session")
def flash():
    """The Triton kernel module; skips when Triton is missing or neither interpreter nor GPU can run it."""
    module = _flash_module()
    if module is None:
        pytest.skip("triton is not installed")
    if not module.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("compiled Triton needs a CUDA GPU; set TRITON_INTERPRET=1 to test on CPU")
    return module


@pytest.fixture(scope="session")
def device(flash) -> torch.device:
    """Where the Triton tests put their tensors: the CPU under the interpreter, else the GPU."""
    return torch.device("cpu" if flash.INTERPRETED else "cuda")
