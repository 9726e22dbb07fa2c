"""Validation metrics for thin structures, as MONAI cumulative metrics (usable with ``IgniteMetricHandler``)."""

from segloss.metrics.topology import (
    BettiNumberError,
    ClDiceMetric,
    DelineationMetric,
    betti_number_error,
    betti_numbers,
    cldice,
    delineation_scores,
)

__all__ = [
    "BettiNumberError",
    "ClDiceMetric",
    "DelineationMetric",
    "betti_number_error",
    "betti_numbers",
    "cldice",
    "delineation_scores",
]
