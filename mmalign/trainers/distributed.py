"""The lifetime of torch.distributed's default process group in launched runs.

accelerate (an ``Accelerator``, or TRL's ``TrainingArguments``) starts the group and destroys it only in
``Accelerator.end_training``, which a script that ends after ``train()`` never calls. A gloo worker thread
drops a finished collective's tensors a moment after the caller's ``wait()`` returns; when Python has let
go of them first, that drop takes the GIL. If the interpreter is finalising by then, Python ends the thread
inside the tensor's destructor and the process dies with SIGABRT ("terminate called without an active
exception"). Only freeing the group joins those threads, and ``destroy_process_group`` alone does not free
it: every ``DistributedDataParallel`` wrapper (the trainer's model) still holds it, through its ``Reducer``
and ``Logger`` too. So an ``atexit`` hook, which runs while the interpreter is still whole, detaches the
group from those wrappers, then destroys it; the last reference goes and the group's destructor, run
without the GIL, lets the workers finish and joins them.
"""

from __future__ import annotations

import atexit
import functools
import gc

import torch.distributed as dist

__all__ = ["destroy_process_group_at_exit"]


def _detach_from_ddp_wrappers() -> None:
    """Drop every live ``DistributedDataParallel``'s references to its process group (the interpreter is
    exiting: the wrappers are not used again). The reducer and logger go first, so the wrapper's own
    ``process_group`` attribute, not the reducer's destructor (which holds the GIL), is a last reference."""
    from torch.distributed import Logger, ProcessGroup, Reducer
    from torch.nn.parallel import DistributedDataParallel

    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel):
            for kinds in ((Reducer, Logger), (ProcessGroup,)):
                for name in [k for k, v in vars(obj).items() if isinstance(v, kinds)]:
                    delattr(obj, name)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        _detach_from_ddp_wrappers()
        dist.destroy_process_group()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Free the default process group, if one is still up, when the interpreter exits (registered once;
    a no-op after ``Accelerator.end_training``)."""
    atexit.register(_destroy_process_group)
