"""The lifetime of torch.distributed's default process group in launched runs.

accelerate (an ``Accelerator``, or TRL's ``TrainingArguments``) starts the group and destroys it only in
``Accelerator.end_training``, which a script that ends after ``train()`` never calls. Left alive, gloo's worker
threads may still be dropping the tensors of the last collective while the interpreter finalises; such a thread
waits for the GIL, Python ends it in the middle of a C++ destructor, and the process dies with SIGABRT
("terminate called without an active exception"). Destroying the group from an ``atexit`` hook, which runs
while the interpreter is still whole, joins those threads first.
"""

from __future__ import annotations

import atexit
import functools

import torch.distributed as dist

__all__ = ["destroy_process_group_at_exit"]


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group, if one is still up, when the interpreter exits (registered once;
    a no-op after ``Accelerator.end_training``)."""
    atexit.register(_destroy_process_group)
