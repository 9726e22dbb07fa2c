"""The overlap statistics every region loss here shares: per-class soft confusion sums (:func:`class_stats`,
:class:`ClassStats`) and the options module of the Dice family and Tversky (:class:`OverlapLossBase`).

``class_stats`` validates, activates and reduces ``input`` against the target to float32 per-class ``tp``,
``sum p`` and ``sum g`` (autocast off; a label map never expanded to one-hot; ``ignore_index`` and ``weight_map``
as one voxel weight; ``batch`` / ``sync_batch`` sums over the batch and the ``torch.distributed`` ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from segloss.losses import _fused
from segloss.losses._fused import fused_paths_enabled
from segloss.losses.class_sums import all_reduce_sum, class_sums
from segloss.losses.cross_entropy import label_voxel_weight
from segloss.losses.inputs import (
    Target,
    Weight,
    _plain,
    activate,
    check_reduction,
    check_sync_batch,
    first_class,
    per_class_weight,
    prepare_target,
    safe_ratio,
    validate_act_args,
)

__all__ = [
    "EMPTY_TARGET",
    "ClassStats",
    "OverlapLossBase",
    "check_lambda",
    "check_options",
    "class_stats",
    "empty_to_fp_rate",
]

EMPTY_TARGET = ("smooth", "fp_rate")


class ClassStats(NamedTuple):
    """Per-class soft confusion sums of the classes used, ``(B, n)`` or (``batch``) ``(n,)``, float32.

    ``count`` is the (weighted) number of valid voxels behind each entry, broadcastable to ``tp``; it is only
    computed when asked for (``empty_target="fp_rate"``). ``ce_sum`` is the fused cross-entropy sum
    ``sum_v w_v cw_t (-log p_t)`` and ``ce_den`` its ``"mean"`` denominator ``sum_v w_v cw_t`` (torch's weighted
    mean) when asked for and the fused path applies, else None.
    """

    tp: torch.Tensor
    pred_sum: torch.Tensor
    target_sum: torch.Tensor
    count: torch.Tensor | None
    spatial_ndim: int
    ce_sum: torch.Tensor | None = None
    ce_den: torch.Tensor | None = None


def check_options(empty_target: str, batch: bool, sync_batch: bool) -> None:
    if empty_target not in EMPTY_TARGET:
        raise ValueError(f"`empty_target` must be one of {EMPTY_TARGET}, got {empty_target!r}.")
    check_sync_batch(batch, sync_batch)


def class_stats(
    input: torch.Tensor,
    target: torch.Tensor | Target,
    weight_map: torch.Tensor | None = None,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    ignore_index: int | None = None,
    batch: bool = False,
    squared_pred: bool = False,
    soft_label: bool = False,
    sync_batch: bool = False,
    with_count: bool = False,
    with_ce: bool = False,
    ce_weight: Weight = None,
) -> ClassStats:
    """Validate, activate and reduce ``input`` ``(B, C, *)`` against ``target`` to :class:`ClassStats`.

    The shared front half of every overlap loss here. A one-channel ``input`` takes a ``(B, *)`` target as a
    binary mask (as ``(B, 1, *)``), not as class indices. ``include_background=False`` drops channel 0 after the
    activation (MONAI; ignored with a warning for one channel).

    ``softmax`` with a label map takes the fused path (:class:`_fused.SoftmaxLabelStats`); there ``with_ce`` also
    returns the class-weighted (``ce_weight``) cross-entropy sum from the same softmax.
    """
    validate_act_args(sigmoid, softmax, other_act)
    tgt = prepare_target(input, target, to_onehot_y=to_onehot_y, ignore_index=ignore_index, weight_map=weight_map)
    ce_sum = ce_den = None
    if fused_paths_enabled() and softmax and tgt.is_labels:  # multi-class: fused, memory-lean softmax + sums (+ CE)
        B, C = input.shape[:2]
        with torch.autocast(input.device.type, enabled=False):
            x = _plain(input).float()  # unflattened: the backward then returns a gradient that is not a view
            v = None  # the CE weight of each voxel, computed once for the sum, its "mean" and the backward
            if with_ce:
                v = label_voxel_weight(tgt, per_class_weight(ce_weight, "weight", C, x.device))
            tp, ps, ts, ce_sum = _fused.SoftmaxLabelStats.apply(x, tgt, squared_pred, batch, sync_batch, v, with_ce)
        if with_ce:
            ce_den = x.new_tensor(float(tgt.labels.numel())) if v is None else v.sum()
        else:
            ce_sum = None
    else:
        p = activate(input, sigmoid=sigmoid, softmax=softmax, other_act=other_act)
        if p.shape != input.shape:
            raise ValueError(f"`other_act` must keep the input's shape {tuple(input.shape)}, got {tuple(p.shape)}.")
        tp, ps, ts = class_sums(
            p, tgt, batch=batch, squared_pred=squared_pred, soft_label=soft_label, sync_batch=sync_batch
        )
    start = first_class(include_background, input.shape[1])
    count = _count(input, tgt, batch, sync_batch) if with_count else None
    if start:
        tp, ps, ts = tp[..., start:], ps[..., start:], ts[..., start:]
        if count is not None and count.shape[-1] > 1:
            count = count[..., start:]
    return ClassStats(tp, ps, ts, count, input.ndim - 2, ce_sum, ce_den)


def _count(x: torch.Tensor, tgt: Target, batch: bool, sync_batch: bool) -> torch.Tensor:
    """Weighted number of valid voxels per (item, class): ``(B, 1)``/``(B, C)``, or ``(1,)``/``(C,)`` with batch."""
    w = tgt.weight
    count = torch.full((x.shape[0], 1), float(x[0, 0].numel()), device=x.device) if w is None else w.sum(-1)
    if batch:
        count = count.sum(0)
        if sync_batch:
            count = all_reduce_sum(count)
    return count


def empty_to_fp_rate(f: torch.Tensor, s: ClassStats) -> torch.Tensor:
    """``empty_target="fp_rate"``: where a class is absent from the target (``target_sum == 0``) the loss is
    ``pred_sum / count``, the mean predicted probability over the valid voxels (0 if none is valid)."""
    return torch.where(s.target_sum == 0, safe_ratio(s.pred_sum, s.count), f)


class OverlapLossBase(nn.Module):
    """Holds the options shared by the Dice-family modules and checks them once, at construction."""

    def _set_common(
        self,
        *,
        include_background,
        to_onehot_y,
        sigmoid,
        softmax,
        other_act,
        reduction,
        smooth_nr,
        smooth_dr,
        batch,
        ignore_index,
        sync_batch,
        empty_target,
    ) -> None:
        validate_act_args(sigmoid, softmax, other_act)
        check_options(empty_target, batch, sync_batch)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.reduction = check_reduction(reduction)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.ignore_index = ignore_index
        self.sync_batch = sync_batch
        self.empty_target = empty_target

    def _common(self) -> dict:
        names = ("include_background", "to_onehot_y", "sigmoid", "softmax", "other_act", "reduction", "smooth_nr")
        names += ("smooth_dr", "batch", "ignore_index", "sync_batch", "empty_target")
        return {k: getattr(self, k) for k in names}


def check_lambda(value: float, name: str) -> float:
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name} should be no less than 0.0.")
    return value
