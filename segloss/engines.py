"""Engine glue for MONAI's ``SupervisedTrainer``: hand per-batch tensors such as a ``weight_map`` to the loss.

MONAI 1.6's ``SupervisedTrainer`` computes ``loss_function(pred, label)``; the extra ``args``/``kwargs`` a
``prepare_batch`` may return go to the *network* (``inferer(inputs, network, *args, **kwargs)``), not to the loss,
so a per-voxel weight map from the data pipeline (e.g. :class:`segloss.transforms.BorderWeightMapd`) has no way
in. :class:`LossKwargsIteration` is an ``iteration_update`` for the trainer: for each batch it binds the batch's
tensors to the loss as keyword arguments and then runs MONAI's own ``SupervisedTrainer._iteration``, so AMP,
the ``GradScaler``, gradient accumulation, ``torch.compile`` and the iteration events behave exactly as in MONAI.

From a bundle config::

    "trainer": {
        "_target_": "SupervisedTrainer",
        "loss_function": "@loss",
        "iteration_update": {"_target_": "segloss.engines.LossKwargsIteration"},
        ...
    }

with a ``weight_map`` key in each batch (``BorderWeightMapd(keys="label", weight_key="weight_map")`` in the
transforms). The loss must take every keyword routed to it: every segloss loss but the Lovász and topology losses
takes ``weight_map`` (``forward(input, target, weight_map=None)``), :class:`~segloss.losses.SkeletonRecallLoss`
takes ``skeleton``. A loss whose ``forward`` does not take a routed keyword raises ``TypeError`` naming both
(:func:`~segloss.losses.compound.call_loss`) rather than train without it; :class:`~segloss.losses.CompoundLoss`
hands each keyword to the terms that take it (``term_kwargs`` restricts that) and raises when none does.
:func:`loss_batch_keys` reads from a loss the keywords its ``term_kwargs`` route, the bundles' default keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segloss.losses.compound import CompoundLoss, call_loss

__all__ = ["LossKwargsIteration", "loss_batch_keys"]


def loss_batch_keys(loss: Callable) -> list[str]:
    """The keywords that the ``term_kwargs`` of ``loss`` route to its terms, sorted: every
    :class:`~segloss.losses.CompoundLoss` in it counts, nested ones too (the pixel term of a
    :class:`~segloss.losses.TopologyAwareLoss`). ``[]`` for a loss without any, or one that is no ``nn.Module``.

    The bundles' default ``loss_batch_keys``: a loss option that names ``skeleton`` for its skeleton-recall term
    then receives the batch's skeleton, which it needs (without one :class:`~segloss.losses.SkeletonRecallLoss`
    scores the segmentation as its skeleton, with no error).

    >>> from segloss.losses import CompoundLoss, DiceLoss, SkeletonRecallLoss
    >>> terms = {"dice": DiceLoss(softmax=True, to_onehot_y=True), "recall": SkeletonRecallLoss(softmax=True)}
    >>> loss_batch_keys(CompoundLoss(terms, term_kwargs={"dice": [], "recall": ["skeleton"]}))
    ['skeleton']
    >>> loss_batch_keys(DiceLoss())
    []
    """
    modules = loss.modules() if isinstance(loss, nn.Module) else ()
    return sorted(
        {key for m in modules if isinstance(m, CompoundLoss) for keys in m.term_kwargs.values() for key in keys}
    )


class _BoundLoss:
    """``loss(pred, target)`` -> ``call_loss(loss, pred, target, **kwargs)`` for one iteration."""

    def __init__(self, loss, kwargs: dict[str, torch.Tensor]) -> None:
        self.loss, self.kwargs = loss, kwargs

    def __call__(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return call_loss(self.loss, input, target, **self.kwargs)


class LossKwargsIteration:
    """``iteration_update`` for MONAI's ``SupervisedTrainer`` that passes batch entries to the loss as kwargs.

    For a batch ``batchdata`` it calls ``engine._iteration(engine, batchdata)`` (MONAI's unchanged training step)
    with ``engine.loss_function`` temporarily replaced by
    ``loss(pred, label, **{arg: batchdata[key] for arg, key in keys.items()})``, each tensor moved to
    ``engine.state.device`` like the image. The original loss is restored after the step, also on error, so
    checkpoints, schedules and handlers see the configured loss object.

    Args:
        keys: loss keyword -> batch key, or a sequence of names that are both (``["weight_map", "skeleton"]``);
            default ``{"weight_map": "weight_map"}``.
        allow_missing_keys: when a batch lacks a key, call the loss without that keyword instead of raising
            ``KeyError``.

    A keyword that the loss's ``forward`` does not take raises ``TypeError`` naming it and the loss (e.g.
    ``skeleton`` for a plain MONAI loss), instead of being dropped.
    """

    def __init__(self, keys: Mapping[str, str] | Sequence[str] | None = None, allow_missing_keys: bool = False) -> None:
        if keys is None:
            keys = {"weight_map": "weight_map"}
        elif isinstance(keys, str) or not isinstance(keys, Mapping):
            keys = {key: key for key in ([keys] if isinstance(keys, str) else keys)}
        keys = dict(keys)
        if not keys or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise ValueError(f"`keys` must be a non-empty mapping of loss keyword -> batch key, got {keys!r}.")
        self.keys = keys
        self.allow_missing_keys = allow_missing_keys

    def loss_kwargs(self, batchdata: Mapping[str, Any], device: torch.device, non_blocking: bool = False) -> dict:
        """The loss keyword arguments of one batch, on ``device``."""
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"`batchdata` must be a dict of tensors to take {list(self.keys.values())} from.")
        kwargs = {}
        for arg, key in self.keys.items():
            if key not in batchdata:
                if self.allow_missing_keys:
                    continue
                raise KeyError(
                    f"batch has no {key!r} entry for the loss's `{arg}` (keys: {sorted(batchdata)}); add a transform "
                    "that writes it, or set allow_missing_keys=True."
                )
            value = batchdata[key]
            kwargs[arg] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return kwargs

    def __call__(self, engine, batchdata: Mapping[str, Any]) -> dict:
        loss = engine.loss_function
        engine.loss_function = _BoundLoss(loss, self.loss_kwargs(batchdata, engine.state.device, engine.non_blocking))
        try:
            return engine._iteration(engine, batchdata)
        finally:
            engine.loss_function = loss
