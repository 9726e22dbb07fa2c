"""Dice-family overlap losses, drop-ins for MONAI 1.6.1's ``DiceLoss`` and ``GeneralizedDiceLoss`` (plus
``JaccardLoss``); the sums with a voxel-wise term: :mod:`segloss.losses.dice_ce`, :mod:`segloss.losses.dice_focal`.

All per-class statistics come from :func:`~segloss.losses.overlap.class_stats`: float32 with autocast off, an integer
label map is never expanded to a one-hot volume (``tp`` is gathered/scattered at the labels), ``ignore_index`` and
a per-voxel ``weight_map`` enter as one voxel weight, and ``batch=True, sync_batch=True`` all-reduces the per-class
sums across ``torch.distributed`` ranks so N ranks give the loss of one process holding the whole batch.

References:
    Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation", 3DV 2016.
    Sudre et al., "Generalised Dice overlap as a deep learning loss function for highly unbalanced segmentations",
    DLMIA 2017.
    Wang & Blaschko, "Jaccard Metric Losses" (NeurIPS 2023) and "Dice Semimetric Losses" (MICCAI 2023) for
    ``soft_label``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from segloss.losses.inputs import (
    Target,
    Weight,
    check_reduction,
    finite_loss,
    per_class_weight,
    reduce_loss,
    safe_ratio,
)
from segloss.losses.overlap import (
    ClassStats,
    OverlapLossBase,
    check_options,
    class_stats,
    empty_to_fp_rate,
)

__all__ = ["DiceLoss", "GeneralizedDiceLoss", "JaccardLoss", "dice_from_stats", "dice_loss", "generalized_dice_loss"]


@finite_loss
def dice_loss(
    input: torch.Tensor,
    target: torch.Tensor | Target,
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
    soft_label: bool = False,
    ignore_index: int | None = None,
    sync_batch: bool = False,
    empty_target: str = "smooth",
) -> torch.Tensor:
    """Functional form of :class:`DiceLoss` (same arguments; see there for shapes, maths and conventions)."""
    reduction = check_reduction(reduction)
    check_options(empty_target, batch, sync_batch)
    s = class_stats(
        input,
        target,
        weight_map,
        include_background=include_background,
        to_onehot_y=to_onehot_y,
        sigmoid=sigmoid,
        softmax=softmax,
        other_act=other_act,
        ignore_index=ignore_index,
        batch=batch,
        squared_pred=squared_pred,
        soft_label=soft_label,
        sync_batch=sync_batch,
        with_count=empty_target == "fp_rate",
    )
    return dice_from_stats(s, jaccard, smooth_nr, smooth_dr, weight, empty_target, reduction)


def dice_from_stats(
    s: ClassStats,
    jaccard: bool,
    smooth_nr: float,
    smooth_dr: float,
    weight: Weight,
    empty_target: str,
    reduction: str,
) -> torch.Tensor:
    tp, ps, ts = s.tp, s.pred_sum, s.target_sum
    # Dice: 2tp / (2tp + fp + fn) = 2tp / (ps + ts);  Jaccard: tp / (tp + fp + fn), written as 2tp / 2(...) as MONAI.
    den = 2 * (ps + ts - tp) if jaccard else ps + ts
    f = 1.0 - (2 * tp + smooth_nr) / (den + smooth_dr)
    if empty_target == "fp_rate":
        f = empty_to_fp_rate(f, s)
    n = tp.shape[-1]
    if weight is not None and n != 1:  # MONAI applies the class weight only with more than one class
        f = f * per_class_weight(weight, "weight", n, f.device)
    return reduce_loss(f, reduction, s.spatial_ndim)


@finite_loss
def generalized_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor | Target,
    weight_map: torch.Tensor | None = None,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    w_type: str = "square",
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    soft_label: bool = False,
    ignore_index: int | None = None,
    sync_batch: bool = False,
    empty_target: str = "smooth",
) -> torch.Tensor:
    """Functional form of :class:`GeneralizedDiceLoss` (same arguments; see there)."""
    reduction = check_reduction(reduction)
    w_type = _check_w_type(w_type)
    check_options(empty_target, batch, sync_batch)
    s = class_stats(
        input,
        target,
        weight_map,
        include_background=include_background,
        to_onehot_y=to_onehot_y,
        sigmoid=sigmoid,
        softmax=softmax,
        other_act=other_act,
        ignore_index=ignore_index,
        batch=batch,
        soft_label=soft_label,
        sync_batch=sync_batch,
        with_count=empty_target == "fp_rate",
    )
    tp, ps, ts = s.tp, s.pred_sum, s.target_sum
    if w_type == "simple":
        w = ts.reciprocal()
    elif w_type == "square":
        w = (ts * ts).reciprocal()
    else:
        w = torch.ones_like(ts)
    # MONAI: an empty class (infinite weight) gets the largest finite weight of its row (of all, with batch)
    infs = torch.isinf(w)
    w = w.masked_fill(infs, 0.0)
    w = w + infs * w.amax(-1, keepdim=True)
    numer = 2.0 * (tp * w).sum(-1, keepdim=True) + smooth_nr
    denom = ((ps + ts) * w).sum(-1, keepdim=True) + smooth_dr
    f = 1.0 - numer / denom  # (B, 1), or (1,) with batch
    if empty_target == "fp_rate":
        # only an item with no target voxel in any class used is "empty": then its loss is the mean over classes
        # of the mean predicted probability (MONAI gives 1 - smooth_nr / smooth_dr = 0 there, whatever the prediction)
        fp_rate = safe_ratio(ps, s.count).mean(-1, keepdim=True)
        f = torch.where(ts.sum(-1, keepdim=True) == 0, fp_rate, f)
    return reduce_loss(f, reduction, s.spatial_ndim)


def _check_w_type(w_type: str) -> str:
    w_type = str(getattr(w_type, "value", w_type)).lower()
    if w_type not in ("square", "simple", "uniform"):
        raise ValueError(f'`w_type` must be one of "square", "simple", "uniform", got {w_type!r}.')
    return w_type


class DiceLoss(OverlapLossBase):
    r"""Soft Dice (or Jaccard) loss, a drop-in for MONAI 1.6.1's ``monai.losses.DiceLoss``.

    For probabilities ``p`` (``input`` after the activation) and target ``g``, per item ``b`` and class ``c`` (with
    ``batch=True`` per class, the voxels ``v`` of all items summed), with voxel weights ``w`` (0 where ignored, else
    ``weight_map``), ``q = 2`` with ``squared_pred`` (else 1) and ``s_nr``, ``s_dr`` = ``smooth_nr``, ``smooth_dr``:

    .. math::

        \mathrm{tp} &= \sum_v w_v p_{vc} g_{vc}, \qquad P = \sum_v w_v p_{vc}^q, \qquad G = \sum_v w_v g_{vc}^q \\
        f_{bc} &= \omega_c \left(1 - \frac{2 \, \mathrm{tp} + s_{nr}}{D + s_{dr}}\right), \qquad
        D = \begin{cases} P + G & \text{dice} \\ 2 (P + G - \mathrm{tp}) & \text{jaccard} \end{cases}

    with the class ``weight`` ``omega_c`` (applied, as MONAI, only with more than one class used), then reduced over
    the (item, class) entries: ``"none"`` gives MONAI's broadcastable ``(B, n, 1, ...)`` (``(n, 1, ...)`` with
    ``batch``). ``soft_label`` uses the L1/L2-norm form of ``tp`` (Wang & Blaschko 2023), exact for soft targets.
    Every value and input gradient equals MONAI's for the options MONAI has.

    **Empty classes.** For an (item, class) with no target voxel, MONAI's smoothed ratio gives
    ``1 - smooth_nr / (sum p + smooth_dr)``: about 1 as soon as ``sum p`` is much larger than ``smooth_dr``, so a
    confident *correct* prediction of 3e-7 per voxel over 1e6 voxels still costs ~0.99 and the gradient pushes
    an already-empty prediction (``empty_target="smooth"``, the default). ``empty_target="fp_rate"`` instead makes
    the loss of such an entry the mean predicted probability over its valid voxels, ``sum_v w_v p_v / sum_v w_v``
    (``p^2`` with ``squared_pred``): 3e-7 costs ~3e-7, predicting 1 everywhere costs 1, and with every voxel
    ignored it is 0. With ``batch=True`` "empty" means empty over the whole (synced) batch.

    Beyond MONAI: ``weight_map`` in :meth:`forward`, ``sync_batch``, ``empty_target``; label maps never expanded
    to one-hot (with ``softmax=True`` the softmax and sums have a closed-form backward that keeps only the
    probabilities and the input gradient); float32 sums under autocast; ``ValueError`` naming the bad argument.

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
        squared_pred: square ``p`` and ``g`` in the denominator.
        jaccard: soft Jaccard (IoU) instead of Dice.
        weight: class weight, scalar or one value per class used (``C - 1`` without background), >= 0.
        soft_label: exact formulation for soft (non-binary) targets.

    Example:
        >>> from segloss.losses import DiceLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))  # (B,C,H,W[,D]), (B,1,H,W[,D])
        >>> p, g = logits.softmax(1)[:, 1:], torch.eye(3)[label[:, 0]].movedim(-1, 1)[:, 1:]  # the formula above
        >>> f = 1 - (2 * (p * g).sum((2, 3)) + 1e-5) / (p.sum((2, 3)) + g.sum((2, 3)) + 1e-5)
        >>> torch.allclose(DiceLoss(to_onehot_y=True, softmax=True, include_background=False)(logits, label), f.mean())
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
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        sync_batch: bool = False,
        empty_target: str = "smooth",
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
        self.soft_label = soft_label
        self.register_buffer("class_weight", per_class_weight(weight, "weight"))

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` logits (with an activation) or probabilities, 2D or 3D.
            target: label map ``(B, 1, *)`` / ``(B, *)`` (integer or whole-number float), or dense ``(B, C, *)``
                one-hot / multi-label / soft; for one channel a binary mask ``(B, 1, *)`` / ``(B, *)``.
            weight_map: optional non-negative voxel weights ``(B, 1, *)`` / ``(B, *)`` (``(B, C, *)`` with a
                dense target).
        """
        return dice_loss(
            input,
            target,
            weight_map,
            squared_pred=self.squared_pred,
            jaccard=self.jaccard,
            weight=self.class_weight,
            soft_label=self.soft_label,
            **self._common(),
        )


class JaccardLoss(DiceLoss):
    r"""Soft Jaccard (IoU) loss: :class:`DiceLoss` with ``jaccard=True`` (keyword arguments as DiceLoss), with its sums:

    .. math::

        f_{bc} = \omega_c \left(1 - \frac{2 \, \mathrm{tp} + s_{nr}}{2 (P + G - \mathrm{tp}) + s_{dr}}\right)

    Example:
        >>> import monai
        >>> from segloss.losses import JaccardLoss
        >>> _ = torch.manual_seed(0)
        >>> x, g = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()  # logits, binary mask
        >>> torch.allclose(JaccardLoss(sigmoid=True)(x, g), monai.losses.DiceLoss(sigmoid=True, jaccard=True)(x, g))
        True
    """

    def __init__(self, **kwargs) -> None:
        if "jaccard" in kwargs:
            raise ValueError("JaccardLoss sets `jaccard=True` itself; use DiceLoss for the Dice form.")
        super().__init__(jaccard=True, **kwargs)


class GeneralizedDiceLoss(OverlapLossBase):
    r"""Generalised Dice loss of Sudre et al. (DLMIA 2017), a drop-in for MONAI 1.6.1's ``GeneralizedDiceLoss``.

    With the per-class sums of :class:`DiceLoss` (no squaring) and class weights ``r_c`` from the target volume
    ``G_c`` (``w_type``: ``"square"`` ``1/G_c^2``, ``"simple"`` ``1/G_c``, ``"uniform"`` 1):

    .. math::

        f_b = 1 - \frac{2 \sum_c r_c \, \mathrm{tp}_c + s_{nr}}{\sum_c r_c (P_c + G_c) + s_{dr}}, \qquad
        r_c = \begin{cases} G_c^{-2}, G_c^{-1} \text{ or } 1 & G_c > 0 \\ \max_{G_{c'} > 0} r_{c'} & G_c = 0 \end{cases}

    per item (``(B, 1)``), or once over the batch with ``batch=True``. As MONAI, a class absent from the target
    (infinite ``r_c``) gets the largest finite weight of the item (of the batch with ``batch``), and an item whose
    every class used is empty gives ``1 - smooth_nr / smooth_dr`` (0 by default) whatever the prediction.
    ``"none"`` gives ``(B, 1, 1, ...)``.

    ``empty_target="fp_rate"`` acts on the items with no target voxel in any class used (e.g. no foreground with
    ``include_background=False``): their loss is the class-mean of the mean predicted probability over the valid
    voxels, so false positives are penalised there (individual empty classes keep MONAI's max weight, which
    already counts their false positives in the denominator).

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act, smooth_nr, smooth_dr: as :class:`DiceLoss`.
        reduction, batch, ignore_index, sync_batch, empty_target: as :class:`DiceLoss`, for the losses ``f_b`` above.
        w_type: ``"square"`` (default), ``"simple"`` or ``"uniform"``.
        soft_label: exact formulation for soft (non-binary) targets.

    Example:
        >>> import monai
        >>> from segloss.losses import GeneralizedDiceLoss
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))  # logits, label map
        >>> kw = dict(to_onehot_y=True, softmax=True)
        >>> torch.allclose(GeneralizedDiceLoss(**kw)(x, y), monai.losses.GeneralizedDiceLoss(**kw)(x, y))
        True
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        w_type: str = "square",
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        sync_batch: bool = False,
        empty_target: str = "smooth",
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
        self.w_type = _check_w_type(w_type)
        self.soft_label = soft_label

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shapes as :meth:`DiceLoss.forward`."""
        return generalized_dice_loss(
            input, target, weight_map, w_type=self.w_type, soft_label=self.soft_label, **self._common()
        )
