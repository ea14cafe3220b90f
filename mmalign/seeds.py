"""Seeds derived from tuples of integers (a run's seed, an epoch, a prompt, a draw …) by NumPy's SeedSequence:
independent streams, the same on every process and in every run, unlike Python's salted ``hash``."""

from __future__ import annotations

import numpy as np

__all__ = ["derived_seed"]


def derived_seed(*keys: int) -> int:
    """A non-negative 63-bit seed for ``torch.Generator().manual_seed`` from ``keys``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
