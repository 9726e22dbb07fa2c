"""``lambda_dice * Dice + lambda_ce * cross-entropy``, a drop-in for MONAI 1.6.1's ``DiceCELoss``: the Dice term of
:mod:`segloss.losses.dice` and the cross-entropy of :mod:`segloss.losses.cross_entropy`, from one prepared target
(and, with a softmax and a label map, one shared log-softmax)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from segloss.losses.cross_entropy import check_ce_args, weighted_cross_entropy
from segloss.losses.dice import dice_from_stats
from segloss.losses.inputs import (
    Weight,
    check_reduction,
    finite_loss,
    per_class_weight,
    prepare_target,
    safe_ratio,
)
from segloss.losses.overlap import OverlapLossBase, check_lambda, check_options, class_stats

__all__ = ["DiceCELoss", "dice_ce_loss"]


@finite_loss
def dice_ce_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    squared_pred: bool = False,
    jaccard: bool = False,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    weight: Weight = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    sync_batch: bool = False,
    empty_target: str = "smooth",
    sigmoid_ce: bool = False,
    ce_weighted_mean: bool = False,
) -> torch.Tensor:
    """Functional form of :class:`DiceCELoss` (same arguments; see there)."""
    reduction = check_reduction(reduction)
    if reduction == "none":
        raise ValueError('`reduction` must be "mean" or "sum" for DiceCELoss (as MONAI), got "none".')
    lambda_dice, lambda_ce = check_lambda(lambda_dice, "lambda_dice"), check_lambda(lambda_ce, "lambda_ce")
    C = input.shape[1] if input.ndim >= 2 else 1
    dice_weight = weight
    if weight is not None and not include_background:
        dice_weight = torch.as_tensor(weight)
        dice_weight = dice_weight[1:] if dice_weight.ndim else dice_weight  # MONAI: the CE weight without class 0
    check_options(empty_target, batch, sync_batch)
    bce = C == 1 or (sigmoid_ce and sigmoid)
    ce_smoothing = label_smoothing if C > 1 else 0.0  # MONAI's BCE term of one channel has no smoothing
    check_ce_args(input, weight_map, label_smoothing=ce_smoothing, sigmoid=bce, pos_weight=weight if bce else None)
    # one prepared target (checks, ignore mask, weight map) for both terms
    tgt = prepare_target(input, target, to_onehot_y=to_onehot_y, ignore_index=ignore_index, weight_map=weight_map)
    s = class_stats(
        input,
        tgt,
        include_background=include_background,
        sigmoid=sigmoid,
        softmax=softmax,
        other_act=other_act,
        batch=batch,
        squared_pred=squared_pred,
        sync_batch=sync_batch,
        with_count=empty_target == "fp_rate",
        with_ce=not bce and label_smoothing == 0,
        ce_weight=weight,
    )
    dice = dice_from_stats(s, jaccard, smooth_nr, smooth_dr, dice_weight, empty_target, reduction)
    if s.ce_sum is not None:  # softmax + label map: the CE came from the same softmax
        ce = s.ce_sum if reduction == "sum" else safe_ratio(s.ce_sum, s.ce_den)
        return lambda_dice * dice + lambda_ce * ce
    if bce:
        # MONAI: BCE-with-logits, `weight` as pos_weight, no label smoothing for one channel
        ce = weighted_cross_entropy(
            input, tgt, sigmoid=True, pos_weight=weight, label_smoothing=ce_smoothing, reduction=reduction
        )
    else:
        dense_mean = weight is not None and reduction == "mean" and not ce_weighted_mean and not tgt.is_labels
        ce = weighted_cross_entropy(
            input,
            tgt,
            class_weight=weight,
            label_smoothing=label_smoothing,
            reduction="sum" if dense_mean else reduction,
        )
        if dense_mean:
            # torch (so MONAI) divides a class-weighted CE with probability targets by the voxel count
            voxels = input[:, 0].numel() if tgt.weight is None else tgt.weight.amin(1).sum()
            ce = safe_ratio(ce, voxels)
    return lambda_dice * dice + lambda_ce * ce


class DiceCELoss(OverlapLossBase):
    r"""``lambda_dice * Dice + lambda_ce * cross-entropy``, a drop-in for MONAI 1.6.1's ``monai.losses.DiceCELoss``.

    The Dice term is :func:`dice_loss`; the CE term is :func:`~segloss.losses.cross_entropy.weighted_cross_entropy`
    on the raw logits (the activation options act on the Dice term only). ``reduction`` is ``"mean"`` or
    ``"sum"`` (MONAI has no ``"none"`` here). ``ignore_index`` and ``weight_map`` reach both terms. With ``"mean"``:

    .. math::

        \mathcal{L} = \lambda_{\text{dice}} \operatorname{mean}_{b,c} f_{bc}
        + \lambda_{\text{ce}} \frac{\sum_i v_i \ell_i}{\sum_i v_i c_i}

    with ``f_bc`` the Dice (or Jaccard) loss of :class:`~segloss.losses.DiceLoss` (class weight ``weight``, or
    ``weight[1:]`` without background), and ``l_i``, the voxel weight ``v_i`` and the voxel's class weight ``c_i``
    of the softmax cross-entropy of :class:`~segloss.losses.WeightedCrossEntropyLoss` (class weight
    ``weight``). ``"sum"`` takes each term's sum instead of its mean. The exceptions below change the CE term: the
    one-channel (or ``sigmoid_ce``) BCE, and the CE denominator ``sum_i v_i`` (the voxel weights alone) for a dense
    target with ``weight`` unless ``ce_weighted_mean``.

    MONAI conventions kept (defaults), with the opt-outs:

    - one input channel: the CE term is ``BCEWithLogits`` with ``weight`` as its ``pos_weight`` and no label
      smoothing. With ``C > 1`` it is the softmax CE even when ``sigmoid=True`` (multi-label targets are then read
      as probabilities); ``sigmoid_ce=True`` uses BCE (``pos_weight=weight``, smoothed) whenever ``sigmoid=True``.
    - ``weight`` has one entry per channel (``C``) and is the CE class weight; with
      ``include_background=False`` the Dice term gets ``weight[1:]``.
    - CE ``"mean"`` with ``weight``: for a label map it is torch's weighted mean ``sum w_y l / sum w_y``; for a
      dense (one-hot) target torch divides by the voxel count instead. ``ce_weighted_mean=True`` uses the
      weighted mean for dense targets too (a one-hot target then gives the label map's value).

    Beyond MONAI: ``ignore_index`` (MONAI's DiceCELoss has none), ``weight_map``, ``sync_batch`` and
    ``empty_target`` (Dice term). With ``softmax=True``, a label map and no label smoothing both terms share one
    log-softmax buffer and a closed-form backward (about half MONAI's peak memory).

    Args:
        include_background: if False, channel 0 (background) is left out (ignored with a warning for one channel).
        to_onehot_y: read the target as a label map of class indices (MONAI's name). A ``(B, 1, *)`` / ``(B, *)``
            target with ``C > 1`` channels is read as a label map anyway; it is never expanded to one-hot.
        sigmoid, softmax, other_act: activation of ``input`` (at most one), applied in float32.
        reduction: ``"mean"`` or ``"sum"`` (``"none"`` raises ``ValueError``, as MONAI): each term's mean or sum.
        smooth_nr, smooth_dr: added to the numerator / denominator (1e-5, MONAI's defaults).
        batch: sum the statistics over the batch before the ratio (one value per class).
        ignore_index: label whose voxels are left out; on a dense target a class index masks that class's voxels,
            another value masks the elements equal to it (MONAI masks voxels with all channels zero there).
        sync_batch: with ``batch=True``, all-reduce the per-class sums over ``torch.distributed`` ranks, so that
            N DDP ranks give the loss and (DDP-averaged) gradients of one process holding the whole batch.
        empty_target: ``"smooth"`` (MONAI) or ``"fp_rate"``: see "Empty classes" in :class:`DiceLoss`.
        squared_pred, jaccard: as :class:`DiceLoss`.
        weight: per-class weight (length ``C``) or scalar: CE class weight (BCE ``pos_weight`` for one channel)
            and Dice class weight (``weight[1:]`` without background).
        lambda_dice, lambda_ce: term weights, >= 0.
        label_smoothing: CE label smoothing in [0, 1] (not applied to MONAI's one-channel BCE).
        sigmoid_ce, ce_weighted_mean: see above (default False = MONAI).

    Example:
        MONAI's Dice plus ``F.cross_entropy``, as MONAI's ``DiceCELoss``:

        >>> import monai
        >>> import torch.nn.functional as F
        >>> from segloss.losses import DiceCELoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
        >>> loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5)
        >>> dice = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)(logits, label)
        >>> torch.allclose(loss(logits, label), dice + 0.5 * F.cross_entropy(logits, label[:, 0]))
        True
        >>> ref = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5)
        >>> torch.allclose(loss(logits, label), ref(logits, label))
        True
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Weight = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        ignore_index: int | None = None,
        sync_batch: bool = False,
        empty_target: str = "smooth",
        sigmoid_ce: bool = False,
        ce_weighted_mean: bool = False,
    ) -> None:
        super().__init__()
        self._set_common(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            ignore_index=ignore_index,
            sync_batch=sync_batch,
            empty_target=empty_target,
        )
        if self.reduction == "none":
            raise ValueError('`reduction` must be "mean" or "sum" for DiceCELoss (as MONAI), got "none".')
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"`label_smoothing` must lie in [0, 1], got {label_smoothing}.")
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.register_buffer("class_weight", per_class_weight(weight, "weight"))
        self.lambda_dice = check_lambda(lambda_dice, "lambda_dice")
        self.lambda_ce = check_lambda(lambda_ce, "lambda_ce")
        self.label_smoothing = float(label_smoothing)
        self.sigmoid_ce = sigmoid_ce
        self.ce_weighted_mean = ce_weighted_mean

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shapes as :meth:`DiceLoss.forward`; ``input`` must be logits (the CE term takes them raw)."""
        return dice_ce_loss(
            input,
            target,
            weight_map,
            squared_pred=self.squared_pred,
            jaccard=self.jaccard,
            weight=self.class_weight,
            lambda_dice=self.lambda_dice,
            lambda_ce=self.lambda_ce,
            label_smoothing=self.label_smoothing,
            sigmoid_ce=self.sigmoid_ce,
            ce_weighted_mean=self.ce_weighted_mean,
            **self._common(),
        )
