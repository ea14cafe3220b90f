"""Reward plug-ins and their composition.

Every reward takes a :class:`~mmalign.media.MediaBatch` and returns a :class:`RewardOutput`. Build rewards by
name with :func:`build` (``available()`` lists the names); concrete reward classes are imported on demand.
"""

from mmalign.rewards.base import SCOPES, Reward, RewardOutput, Scope
from mmalign.rewards.composite import WeightedSum
from mmalign.rewards.registry import ENTRY_POINT_GROUP, available, build, register, resolve

__all__ = [
    "ENTRY_POINT_GROUP",
    "SCOPES",
    "Reward",
    "RewardOutput",
    "Scope",
    "WeightedSum",
    "available",
    "build",
    "register",
    "resolve",
]
