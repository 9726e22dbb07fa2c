"""Term-weight schedules for :class:`~segloss.losses.CompoundLoss`, e.g. cross-entropy warm-up, then Lovász.

Berman et al. (CVPR 2018) train with cross-entropy first and switch to the Lovász-Softmax loss for the last epochs;
a :class:`TermWeightSchedule` expresses such plans as weight-versus-step curves, one per named term, and applies them
through :meth:`CompoundLoss.set_weight`. It is pure (no training-loop dependency): call :meth:`TermWeightSchedule.apply`
from any loop, or attach :class:`segloss.handlers.LossWeightScheduler` to an ignite / MONAI engine.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

__all__ = ["TermWeightSchedule"]


class TermWeightSchedule:
    """Weight of each named loss term as a piecewise function of the step (epoch or iteration, counted from 0).

    Each term has a list of ``(step, weight)`` points with strictly increasing steps. ``mode="linear"`` interpolates
    linearly between points; ``mode="step"`` holds each point's weight until the next point. Before the first point
    the first weight holds, after the last point the last one. Terms of the loss not named keep their weights.

    CE warm-up for 10 epochs, a linear hand-over to Lovász until epoch 20::

        TermWeightSchedule({"ce": [(10, 1.0), (20, 0.0)], "lovasz": [(10, 0.0), (20, 1.0)]})

    In a bundle config (JSON lists for the points)::

        {"_target_": "segloss.losses.TermWeightSchedule",
         "points": {"ce": [[10, 1.0], [20, 0.0]], "lovasz": [[10, 0.0], [20, 1.0]]}}

    Args:
        points: term name -> sequence of ``(step, weight)``; weights finite and >= 0.
        mode: ``"linear"`` or ``"step"``.
    """

    def __init__(self, points: Mapping[str, Sequence[Sequence[float]]], mode: str = "linear") -> None:
        if mode not in ("linear", "step"):
            raise ValueError(f'`mode` must be "linear" or "step", got {mode!r}.')
        if not isinstance(points, Mapping) or not points:
            raise ValueError("`points` must map at least one term name to a list of (step, weight) points.")
        self.mode = mode
        self.points: dict[str, tuple[list[float], list[float]]] = {}
        for name, pts in points.items():
            try:
                steps = [float(p[0]) for p in pts]
                weights = [float(p[1]) for p in pts]
                ok = all(len(p) == 2 for p in pts)
            except (TypeError, IndexError, ValueError):
                ok = False
            if not ok or not steps:
                raise ValueError(f"`points[{name!r}]` must be a non-empty list of (step, weight) pairs, got {pts!r}.")
            if any(b <= a for a, b in zip(steps, steps[1:])) or not all(map(math.isfinite, steps)):
                raise ValueError(f"`points[{name!r}]` steps must be finite and strictly increasing, got {steps}.")
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"`points[{name!r}]` weights must be finite and >= 0, got {weights}.")
            self.points[str(name)] = (steps, weights)

    def weights(self, step: float) -> dict[str, float]:
        """The weight of every scheduled term at ``step``."""
        out = {}
        for name, (steps, weights) in self.points.items():
            i = bisect.bisect_right(steps, step)  # points at or before `step`: steps[:i]
            if i == 0:
                out[name] = weights[0]
            elif i == len(steps) or self.mode == "step":
                out[name] = weights[i - 1]
            else:
                t = (step - steps[i - 1]) / (steps[i] - steps[i - 1])
                out[name] = weights[i - 1] + t * (weights[i] - weights[i - 1])
        return out

    def apply(self, loss, step: float) -> dict[str, float]:
        """Set the weights at ``step`` on ``loss`` (anything with ``set_weight(name, value)``, e.g.
        :class:`~segloss.losses.CompoundLoss`, which raises ``KeyError`` for an unknown term); returns them."""
        weights = self.weights(step)
        for name, value in weights.items():
            loss.set_weight(name, value)
        return weights

    def __repr__(self) -> str:
        pts = {k: list(zip(*v)) for k, v in self.points.items()}
        return f"TermWeightSchedule({pts}, mode={self.mode!r})"
