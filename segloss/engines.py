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
transforms). The loss must accept it: every segloss loss but the Lovász and topology losses does
(``forward(input, target, weight_map=None)``); a loss that does not raises ``TypeError`` rather than train
unweighted (:func:`~segloss.losses.compound.call_loss`), and :class:`~segloss.losses.CompoundLoss` passes it to
its terms (``term_kwargs`` keeps it away from a term that does not take it).

:func:`vgg19_weights` picks the topology term's VGG-19 weights from a bundle option, so that a bundle runs on an
offline machine (``"auto"``) or insists on the paper's ImageNet features (``"imagenet"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from segloss.losses.compound import call_loss
from segloss.networks.vgg import WeightsNotFoundError, load_vgg19_state_dict

__all__ = ["LossKwargsIteration", "vgg19_weights"]

logger = logging.getLogger(__name__)


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
        keys: loss keyword -> batch key, default ``{"weight_map": "weight_map"}``.
        allow_missing_keys: when a batch lacks a key, call the loss without that keyword instead of raising
            ``KeyError``.

    A keyword is dropped for losses whose ``forward`` does not take it (e.g. ``skeleton`` for a plain MONAI loss),
    like :class:`~segloss.losses.CompoundLoss` does for its terms, except ``weight_map``, which raises
    ``TypeError`` there: the loss would silently be unweighted.
    """

    def __init__(self, keys: Mapping[str, str] | None = None, allow_missing_keys: bool = False) -> None:
        keys = {"weight_map": "weight_map"} if keys is None else dict(keys)
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


def vgg19_weights(choice: str | os.PathLike | None = "auto") -> str | os.PathLike | Mapping | None:
    """The ``weights`` argument of :class:`segloss.losses.TopologyLoss` for a bundle option ``choice``.

    - ``"auto"``: the ImageNet VGG-19 if it is on this machine (``$SEGLOSS_VGG19_WEIGHTS`` or torch hub's cache;
      nothing is downloaded), else a seeded random initialisation, with a warning saying so. The random-feature
      term is still a multi-scale perceptual loss on the probability map (random 3x3 filter banks respond to
      lines and gaps), but it is not the paper's ImageNet term.
    - ``"imagenet"``: the ImageNet weights, downloaded when online; otherwise
      :class:`segloss.networks.WeightsNotFoundError` lists how to provide them.
    - ``"random"`` or None: the seeded random initialisation.
    - a path: that state dict.
    """
    if choice == "auto":
        try:
            state = load_vgg19_state_dict("imagenet", download=False)
        except WeightsNotFoundError:
            logger.warning(
                "topology term: ImageNet VGG-19 weights not found on this machine (set $SEGLOSS_VGG19_WEIGHTS or "
                "use topology_weights='imagenet' to download them); using seeded RANDOM VGG-19 features instead."
            )
            return None
        logger.info("topology term: ImageNet VGG-19 weights found on this machine.")
        return state
    if choice is None or choice == "random":
        logger.info("topology term: seeded random VGG-19 features (topology_weights='random').")
        return None
    if not isinstance(choice, (str, os.PathLike)):
        raise TypeError(f"`choice` must be 'auto', 'imagenet', 'random', None or a path, got {type(choice).__name__}.")
    return choice
