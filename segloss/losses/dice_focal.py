"""``lambda_dice * Dice + lambda_focal * focal``, a drop-in for MONAI 1.6.1's ``DiceFocalLoss``: the Dice term of
:mod:`segloss.losses.dice` and the focal term of :mod:`segloss.losses.focal`, from one prepared target."""

from __future__ import annotations

from collections.abc import Callable

import torch

from segloss.losses.dice import dice_loss
from segloss.losses.focal import focal_loss, set_alpha
from segloss.losses.inputs import (
    Weight,
    finite_loss,
    per_class_weight,
    prepare_target,
)
from segloss.losses.overlap import OverlapLossBase, check_lambda

__all__ = ["DiceFocalLoss", "dice_focal_loss"]


@finite_loss
def dice_focal_loss(
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
    gamma: float = 2.0,
    weight: Weight = None,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    alpha: Weight = None,
    ignore_index: int | None = None,
    sync_batch: bool = False,
    empty_target: str = "smooth",
    use_softmax: bool = False,
) -> torch.Tensor:
    """Functional form of :class:`DiceFocalLoss` (same arguments; see there)."""
    lambda_dice = check_lambda(lambda_dice, "lambda_dice")
    lambda_focal = check_lambda(lambda_focal, "lambda_focal")
    common = dict(include_background=include_background, weight=weight, reduction=reduction)
    # one prepared target (checks, ignore mask, weight map) for both terms
    tgt = prepare_target(input, target, to_onehot_y=to_onehot_y, ignore_index=ignore_index, weight_map=weight_map)
    # ce_mean: "mean" divides by the valid voxels whether or not ignore_index is set (ignoring == cropping).
    # The focal term goes first: backward then runs the Dice term's first, and its gradient buffer receives the
    # focal gradient in place, so two full-size tensors (not three) are alive at the peak.
    focal = focal_loss(input, tgt, gamma=gamma, alpha=alpha, use_softmax=use_softmax, ce_mean=True, **common)
    dice = dice_loss(
        input,
        tgt,
        sigmoid=sigmoid,
        softmax=softmax,
        other_act=other_act,
        squared_pred=squared_pred,
        jaccard=jaccard,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
        sync_batch=sync_batch,
        empty_target=empty_target,
        **common,
    )
    return lambda_dice * dice + lambda_focal * focal


class DiceFocalLoss(OverlapLossBase):
    r"""``lambda_dice * Dice + lambda_focal * focal``, a drop-in for MONAI 1.6.1's ``monai.losses.DiceFocalLoss``.

    The Dice term is :func:`dice_loss`; the focal term is :func:`~segloss.losses.focal.focal_loss` on the raw
    logits. As MONAI 1.6.1 (which has no ``use_softmax`` here) the focal term is the **sigmoid** (per-channel
    binary) focal loss, also with ``softmax=True``; ``use_softmax=True`` takes the softmax focal loss instead
    (one class per voxel; its ``"mean"`` then divides by the valid voxels, like ``F.cross_entropy`` at
    ``gamma = 0``). ``include_background``, ``weight`` (one entry per channel *used*, ``C - 1`` without
    background) and ``reduction`` reach both terms as in MONAI, ``alpha`` the focal term; ``"none"`` is the
    broadcast sum of Dice ``(B, n, 1, ...)`` and focal ``(B, n, *spatial)``.

    With ``"mean"``, for ``n`` channels used and the (weighted) valid voxel count ``V``:

    .. math::

        \mathcal{L} = \lambda_{\text{dice}} \operatorname{mean}_{b,c} f_{bc}
        + \lambda_{\text{focal}} \frac{\sum_{b,c,v} \ell_{bcv}}{k \, V}, \qquad
        k = \begin{cases} n & \text{sigmoid focal (default)} \\ 1 & \mathtt{use\_softmax} \end{cases}

    with ``f_bc`` the Dice (or Jaccard) loss of :class:`~segloss.losses.DiceLoss` and ``l_bcv`` the focal
    loss of :class:`~segloss.losses.FocalLoss` (``ce_mean=True``), both with the class ``weight`` of the
    channels used. ``"sum"`` adds the sums (the focal one averaged over the spatial dims first, as MONAI's
    ``FocalLoss``).

    ``ignore_index`` and ``weight_map`` (not in MONAI's DiceFocalLoss) reach both terms. The focal ``"mean"``
    divides by the (weighted) valid voxel count, times the channels used for the sigmoid focal term (its
    per-channel BCE) and not for ``use_softmax`` (one class per voxel, so ``gamma = 0`` gives ``F.cross_entropy``),
    whether or not ``ignore_index`` is set, so ignoring voxels equals cropping them (MONAI's FocalLoss drops the
    channel factor once ``ignore_index`` is set).

    Args:
        include_background: if False, channel 0 (background) is left out (ignored with a warning for one channel).
        to_onehot_y: read the target as a label map of class indices (MONAI's name). A ``(B, 1, *)`` / ``(B, *)``
            target with ``C > 1`` channels is read as a label map anyway; it is never expanded to one-hot.
        sigmoid, softmax, other_act: activation of ``input`` (at most one), applied in float32.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the per-(item, class) losses.
        smooth_nr, smooth_dr: added to the numerator / denominator (1e-5, MONAI's defaults).
        batch: sum the statistics over the batch before the ratio (one value per class).
        ignore_index: label whose voxels are left out; on a dense target a class index masks that class's voxels,
            another value masks the elements equal to it (MONAI masks voxels with all channels zero there).
        sync_batch: with ``batch=True``, all-reduce the per-class sums over ``torch.distributed`` ranks, so that
            N DDP ranks give the loss and (DDP-averaged) gradients of one process holding the whole batch.
        empty_target: ``"smooth"`` (MONAI) or ``"fp_rate"``: see "Empty classes" in :class:`DiceLoss`.
        squared_pred, jaccard: as :class:`DiceLoss`.
        gamma: focal exponent, >= 0.
        weight: class weight (scalar or one per channel used) for both terms.
        lambda_dice, lambda_focal: term weights, >= 0.
        alpha: focal alpha (MONAI's conventions, see :class:`~segloss.losses.focal.FocalLoss`).
        use_softmax: softmax focal term instead of MONAI's sigmoid one.

    Example:
        Values equal MONAI's; with ``use_softmax`` and ``gamma = 0`` the focal term is ``F.cross_entropy``:

        >>> import monai
        >>> import torch.nn.functional as F
        >>> from segloss.losses import DiceFocalLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
        >>> kw = dict(to_onehot_y=True, softmax=True, gamma=2.0)
        >>> torch.allclose(DiceFocalLoss(**kw)(logits, label), monai.losses.DiceFocalLoss(**kw)(logits, label))
        True
        >>> loss = DiceFocalLoss(to_onehot_y=True, softmax=True, gamma=0.0, use_softmax=True)
        >>> dice = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)(logits, label)
        >>> torch.allclose(loss(logits, label), dice + F.cross_entropy(logits, label[:, 0]))
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
        gamma: float = 2.0,
        weight: Weight = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: Weight = None,
        *,
        ignore_index: int | None = None,
        sync_batch: bool = False,
        empty_target: str = "smooth",
        use_softmax: bool = False,
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
        self.squared_pred = squared_pred
        self.jaccard = jaccard
        self.gamma = float(gamma)
        if not self.gamma >= 0:
            raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
        self.register_buffer("class_weight", per_class_weight(weight, "weight"))
        self.lambda_dice = check_lambda(lambda_dice, "lambda_dice")
        self.lambda_focal = check_lambda(lambda_focal, "lambda_focal")
        set_alpha(self, alpha)
        self.use_softmax = use_softmax

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shapes as :meth:`DiceLoss.forward`; ``input`` must be logits (the focal term takes them raw)."""
        return dice_focal_loss(
            input,
            target,
            weight_map,
            squared_pred=self.squared_pred,
            jaccard=self.jaccard,
            gamma=self.gamma,
            weight=self.class_weight,
            lambda_dice=self.lambda_dice,
            lambda_focal=self.lambda_focal,
            alpha=self.alpha,
            use_softmax=self.use_softmax,
            **self._common(),
        )
