"""Inference-time alignment: raising a reward by optimising each sample's initial noise (ReNO), the generator's
weights untouched, with the run folder the ``mmalign optimize`` command writes."""

from mmalign.inference.reno import (
    IterationState,
    NoiseOptimization,
    chi_regularizer,
    optimize_noise,
    seeded_noise,
)

__all__ = ["IterationState", "NoiseOptimization", "chi_regularizer", "optimize_noise", "seeded_noise"]
