"""Ignite / MONAI engine handlers for segloss (needs the ``bundle`` extra: ``pytorch-ignite``).

Handlers may import losses; losses never import ignite.
"""

from __future__ import annotations

from collections.abc import Mapping

from ignite.engine import Engine, Events

from segloss.losses.schedule import TermWeightSchedule

__all__ = ["LossWeightScheduler"]


class LossWeightScheduler:
    """Apply a :class:`~segloss.losses.TermWeightSchedule` to a :class:`~segloss.losses.CompoundLoss` during training.

    With ``by="epoch"`` the weights are set at the start of every epoch from ``step = epoch - 1`` (the first epoch is
    step 0); with ``by="iteration"`` at the start of every iteration from ``step = iteration - 1``. Both follow the
    engine state, so a run resumed from a checkpoint gets the weights of where it resumed. The weights last set are
    in :attr:`last_weights` (and a term at weight 0 is skipped by ``CompoundLoss``, so a warm-up costs nothing).

    In a MONAI bundle config (``"@loss"`` being the ``CompoundLoss`` the trainer uses)::

        "train": {"handlers": [
            {"_target_": "segloss.handlers.LossWeightScheduler", "loss": "@loss", "by": "epoch",
             "schedule": {"ce": [[0, 1.0], [50, 1.0], [60, 0.0]], "lovasz": [[50, 0.0], [60, 1.0]]}}
        ]}

    Args:
        loss: the loss whose weights to set (anything with ``set_weight(name, value)``).
        schedule: a :class:`TermWeightSchedule`, or its ``points`` mapping (linear mode).
        by: ``"epoch"`` or ``"iteration"``.
    """

    def __init__(self, loss, schedule: TermWeightSchedule | Mapping, by: str = "epoch") -> None:
        if by not in ("epoch", "iteration"):
            raise ValueError(f'`by` must be "epoch" or "iteration", got {by!r}.')
        if not callable(getattr(loss, "set_weight", None)):
            raise TypeError(
                f"`loss` must have a set_weight(name, value) method (CompoundLoss), got {type(loss).__name__}."
            )
        if isinstance(schedule, Mapping):
            schedule = TermWeightSchedule(schedule)
        if not isinstance(schedule, TermWeightSchedule):
            raise TypeError(
                f"`schedule` must be a TermWeightSchedule or a mapping of points, got {type(schedule).__name__}."
            )
        unknown = set(schedule.points) - set(getattr(loss, "losses", schedule.points))
        if unknown:
            raise ValueError(f"`schedule` names unknown loss terms {sorted(unknown)}; terms are {list(loss.losses)}.")
        self.loss = loss
        self.schedule = schedule
        self.by = by
        self.last_weights: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        event = Events.EPOCH_STARTED if self.by == "epoch" else Events.ITERATION_STARTED
        if not engine.has_event_handler(self, event):
            engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        step = (engine.state.epoch if self.by == "epoch" else engine.state.iteration) - 1
        self.last_weights = self.schedule.apply(self.loss, step)
