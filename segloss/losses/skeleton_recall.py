"""Skeleton Recall loss of Kirchhoff et al., "Skeleton Recall Loss for Connectivity Conserving and Resource
Efficient Segmentation of Thin Tubular Structures", ECCV 2024.

Instead of a differentiable skeleton of the prediction (clDice), the skeleton of the *ground truth* is computed
once per sample on the CPU (in the data pipeline: skeletonise each class, then dilate it slightly into a "tube")
and the loss asks the prediction to cover it: a soft recall on the skeleton voxels. A missed skeleton voxel is a
break in the structure, so recall on the skeleton rewards connectivity at almost no training cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from segloss.losses.class_sums import class_sums
from segloss.losses.inputs import (
    activate,
    check_reduction,
    check_sync_batch,
    finite_loss,
    prepare_target,
    reduce_loss,
    validate_act_args,
)

__all__ = ["SkeletonRecallLoss", "skeleton_recall"]


@finite_loss
def skeleton_recall(
    tp: torch.Tensor, skeleton_sum: torch.Tensor, smooth_nr: float = 1.0, smooth_dr: float = 1.0
) -> torch.Tensor:
    """Soft recall on the skeleton: ``(tp + smooth_nr) / max(skeleton_sum + smooth_dr, 1e-8)``.

    ``tp = sum_v p_vc s_vc`` and ``skeleton_sum = sum_v s_vc`` (any matching shapes, e.g. ``(B, C)``). The
    1e-8 floor (as nnU-Net) keeps ``smooth_dr=0`` finite: a class without skeleton then has recall 0.
    """
    return (tp + smooth_nr) / (skeleton_sum + smooth_dr).clamp_min(1e-8)


class SkeletonRecallLoss(nn.Module):
    r"""``1 - recall`` of the predicted probabilities on the target's (tubed) skeleton, per class.

    For class c (and sample b unless ``batch``), with ``p`` the activated prediction, ``s`` the skeleton and
    ``w`` the voxel weight (0 at ignored voxels):

    .. math::

        \mathrm{recall}_{bc} = \frac{\sum_v w_v \, p_{bcv} \, s_{bcv} + s_{nr}}
        {\max\left(\sum_v w_v \, s_{bcv} + s_{dr}, \ 10^{-8}\right)}, \qquad
        \mathrm{loss}_{bc} = 1 - \mathrm{recall}_{bc}

    (``s_nr``, ``s_dr`` = ``smooth_nr``, ``smooth_dr``; the ``1e-8`` floor, as nnU-Net, keeps ``smooth_dr=0``
    finite) and ``reduction="mean"`` gives ``1 - mean_c recall_c``; ``"none"`` gives ``(B, n, 1, ...)``
    (``(n, 1, ...)`` with ``batch``). This is nnU-Net's ``SoftSkeletonRecallLoss``
    (MIC-DKFZ/Skeleton-Recall; smoothing 1 in numerator and denominator, background excluded) shifted by 1 so that
    a perfect recall gives 0 (nnU-Net returns ``-recall``; gradients are identical). A class with an empty
    skeleton has recall 1 (with the default smoothing) and costs nothing. Recall alone is satisfied by predicting
    everything, so always combine it with a region loss.

    Target: the skeleton, **not** the segmentation: an integer label map ``(B, 1, *)`` / ``(B, *)`` holding the
    class value on skeleton voxels and 0 elsewhere (``segloss.transforms.Skeletonize`` makes one from a label
    map), or a dense ``(B, C, *)`` one-hot skeleton. Label maps are never expanded to one-hot (per-class sums via
    :func:`segloss.losses.class_sums.class_sums`).

    Ignored voxels: the skeleton is computed from the segmentation, so either keep ``ignore_index`` in the
    skeleton map, or pass ``weight_map=(label != ignore_index)`` to :meth:`forward` (as nnU-Net's loss mask).

    Combining: the paper adds it with weight 1 to nnU-Net's Dice + CE. The region terms take the segmentation
    and this one the skeleton; pass the skeleton as the ``skeleton`` keyword, which then replaces ``target``, so
    one :class:`~segloss.losses.CompoundLoss` (which hands keywords to the terms that accept them) holds all (see
    the example below).

    MONAI's ``SoftclDiceLoss`` (Shit et al., CVPR 2021) instead skeletonises prediction and segmentation on the
    fly by iterated soft min/max pooling, at a cost this loss avoids; in MONAI 1.6 it takes logits and a label map
    (``SoftclDiceLoss(softmax=True, to_onehot_y=True)``) and is a term of the same ``CompoundLoss`` as it is.

    Args:
        include_background: use channel 0 when there are several channels (one channel is always used).
        to_onehot_y, sigmoid, softmax, other_act: as MONAI (see :mod:`segloss.losses.inputs`).
        ignore_index: label (label-map target) or value (dense target) to ignore.
        batch: sum the statistics over the batch before the ratio (nnU-Net's ``batch_dice``).
        sync_batch: with ``batch``, also sum them over ``torch.distributed`` ranks.
        smooth_nr, smooth_dr: added to numerator and denominator (default 1, as nnU-Net).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the per-(sample, class) values.

    Example:
        The formula above, for a label-map skeleton (class 1: a row, class 2: a column); then the compound loss:

        >>> import segloss
        >>> _ = torch.manual_seed(0)
        >>> logits, skeleton = torch.randn(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long)
        >>> skeleton[:, 0, 4, 1:7], skeleton[:, 0, 1:4, 2] = 1, 2
        >>> p, s = logits.softmax(1)[:, 1:], (skeleton == torch.tensor([1, 2]).view(1, 2, 1, 1)).float()
        >>> recall = ((p * s).sum((2, 3)) + 1) / (s.sum((2, 3)) + 1)
        >>> torch.allclose(segloss.SkeletonRecallLoss(softmax=True)(logits, skeleton), 1 - recall.mean())
        True
        >>> loss = segloss.CompoundLoss({"dice": segloss.DiceLoss(to_onehot_y=True, softmax=True),
        ...                              "ce": segloss.WeightedCrossEntropyLoss(),
        ...                              "skel": segloss.SkeletonRecallLoss(softmax=True)})
        >>> label = torch.randint(0, 3, (2, 1, 8, 8))
        >>> value = loss(logits, label, skeleton=skeleton)  # dice/ce see `label`, skel sees `skeleton`
        >>> torch.allclose(loss.last_terms["skel"], 1 - recall.mean())
        True
    """

    def __init__(
        self,
        include_background: bool = False,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        ignore_index: int | None = None,
        batch: bool = False,
        sync_batch: bool = False,
        smooth_nr: float = 1.0,
        smooth_dr: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        validate_act_args(sigmoid, softmax, other_act)
        self.reduction = check_reduction(reduction)
        for name, value in (("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
            if not (float(value) >= 0 and float(value) != float("inf")):
                raise ValueError(f"`{name}` must be finite and >= 0, got {value}.")
        check_sync_batch(batch, sync_batch)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.ignore_index = ignore_index
        self.batch = batch
        self.sync_batch = sync_batch
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        weight_map: torch.Tensor | None = None,
        skeleton: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, *spatial)``, 2D or 3D.
            target: skeleton label map ``(B, 1, *)`` / ``(B, *)`` or dense skeleton ``(B, C, *)``; unused when
                ``skeleton`` is given (then it is the segmentation other terms of a compound loss take).
            weight_map: optional non-negative voxel weights ``(B, 1, *)``, e.g. a 0/1 mask of valid voxels.
            skeleton: the skeleton target, in the forms ``target`` takes.
        """
        if skeleton is not None:
            target = skeleton
        tgt = prepare_target(
            input, target, to_onehot_y=self.to_onehot_y, ignore_index=self.ignore_index, weight_map=weight_map
        )
        pred = activate(input, self.sigmoid, self.softmax, self.other_act)
        tp, _, skeleton_sum = class_sums(pred, tgt, batch=self.batch, sync_batch=self.sync_batch)
        if not self.include_background and pred.shape[1] > 1:
            tp, skeleton_sum = tp[..., 1:], skeleton_sum[..., 1:]
        f = 1.0 - skeleton_recall(tp, skeleton_sum, self.smooth_nr, self.smooth_dr)
        return reduce_loss(f, self.reduction, input.ndim - 2)
