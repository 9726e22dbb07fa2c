"""Tversky and focal Tversky losses.

Tversky index (Salehi et al., "Tversky loss function for image segmentation using 3D fully convolutional deep
networks", MLMI 2017): ``TI = tp / (tp + alpha fp + beta fn)`` trades false positives against false negatives;
``alpha = beta = 0.5`` is Dice, ``alpha = beta = 1`` Jaccard. :class:`TverskyLoss` is a drop-in for MONAI 1.6.1's
``monai.losses.TverskyLoss`` (``alpha`` weighs the false positives, ``beta`` the false negatives, as MONAI).

Focal Tversky (Abraham & Khan, "A Novel Focal Tversky Loss Function with Improved Attention U-Net for Lesion
Segmentation", ISBI 2019) raises ``1 - TI`` to a power so that the loss concentrates on the hard, poorly segmented
classes. Statistics come from :func:`segloss.losses.overlap.class_stats` (label maps never one-hot expanded, float32
sums, ``ignore_index``, ``weight_map``, ``sync_batch``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from segloss.losses.inputs import check_reduction, finite_loss, reduce_loss
from segloss.losses.overlap import (
    ClassStats,
    OverlapLossBase,
    check_options,
    class_stats,
    empty_to_fp_rate,
)

__all__ = ["FocalTverskyLoss", "TverskyLoss", "focal_tversky_loss", "tversky_loss"]

# (1 - TI)^gamma with gamma < 1 has an infinite slope at a perfect prediction: below this base it is linear.
_BASE_FLOOR = 1e-7


def _tversky_stats(input, target, weight_map, empty_target, kw) -> ClassStats:
    check_options(empty_target, kw["batch"], kw["sync_batch"])
    return class_stats(input, target, weight_map, with_count=empty_target == "fp_rate", **kw)


def _tversky_index(s: ClassStats, alpha: float, beta: float, smooth_nr: float, smooth_dr: float) -> torch.Tensor:
    fp = s.pred_sum - s.tp
    fn = s.target_sum - s.tp
    return (s.tp + smooth_nr) / (s.tp + alpha * fp + beta * fn + smooth_dr)


def _check_ab(alpha: float, beta: float) -> tuple[float, float]:
    alpha, beta = float(alpha), float(beta)
    if not (alpha >= 0 and beta >= 0 and math.isfinite(alpha + beta)):
        raise ValueError(f"`alpha` and `beta` must be finite and >= 0, got alpha={alpha}, beta={beta}.")
    return alpha, beta


@finite_loss
def tversky_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    alpha: float = 0.5,
    beta: float = 0.5,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    soft_label: bool = False,
    ignore_index: int | None = None,
    sync_batch: bool = False,
    empty_target: str = "smooth",
) -> torch.Tensor:
    """Functional form of :class:`TverskyLoss` (same arguments; see there)."""
    reduction = check_reduction(reduction)
    alpha, beta = _check_ab(alpha, beta)
    kw = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid, softmax=softmax)
    kw |= dict(other_act=other_act, batch=batch, soft_label=soft_label, ignore_index=ignore_index)
    s = _tversky_stats(input, target, weight_map, empty_target, kw | dict(sync_batch=sync_batch))
    f = 1.0 - _tversky_index(s, alpha, beta, smooth_nr, smooth_dr)
    if empty_target == "fp_rate":
        f = empty_to_fp_rate(f, s)
    return reduce_loss(f, reduction)


@finite_loss
def focal_tversky_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable | None = None,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 0.75,
    reduction: str = "mean",
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    soft_label: bool = False,
    ignore_index: int | None = None,
    sync_batch: bool = False,
    empty_target: str = "smooth",
) -> torch.Tensor:
    """Functional form of :class:`FocalTverskyLoss` (same arguments; see there)."""
    reduction = check_reduction(reduction)
    alpha, beta = _check_ab(alpha, beta)
    gamma = _check_gamma(gamma)
    kw = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid, softmax=softmax)
    kw |= dict(other_act=other_act, batch=batch, soft_label=soft_label, ignore_index=ignore_index)
    s = _tversky_stats(input, target, weight_map, empty_target, kw | dict(sync_batch=sync_batch))
    base = 1.0 - _tversky_index(s, alpha, beta, smooth_nr, smooth_dr)
    # below the floor (a perfect prediction) continue linearly: f(0) = 0 with a finite slope for gamma < 1
    f = torch.where(base > _BASE_FLOOR, base.clamp_min(_BASE_FLOOR).pow(gamma), base * _BASE_FLOOR ** (gamma - 1))
    if empty_target == "fp_rate":
        f = empty_to_fp_rate(f, s)  # the FP rate itself, not raised to gamma: linear, bounded slope at 0
    return reduce_loss(f, reduction)


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not (gamma > 0 and math.isfinite(gamma)):
        raise ValueError(f"`gamma` must be finite and > 0, got {gamma}.")
    return gamma


class TverskyLoss(OverlapLossBase):
    r"""Tversky loss (Salehi et al., MLMI 2017), a drop-in for MONAI 1.6.1's ``monai.losses.TverskyLoss``.

    With the per-class sums of :class:`~segloss.losses.dice.DiceLoss` (``tp``, ``P = sum w p``, ``G = sum w g``;
    ``fp = P - tp``, ``fn = G - tp``), per item (or over the batch) and class:

    .. math::

        f_{bc} = 1 - \mathrm{TI}_{bc}, \qquad \mathrm{TI}_{bc} = \frac{\mathrm{tp} + s_{nr}}
        {\mathrm{tp} + \alpha \, (P - \mathrm{tp}) + \beta \, (G - \mathrm{tp}) + s_{dr}}

        \mathrm{tp} = \sum_v w_v p_{vc} g_{vc}, \quad P = \sum_v w_v p_{vc}, \quad G = \sum_v w_v g_{vc}

    (``s_nr``, ``s_dr`` = ``smooth_nr``, ``smooth_dr``; ``soft_label``: the norm form of ``tp`` of DiceLoss), then
    reduced over the (item, class) entries.
    ``alpha`` weighs false positives and ``beta`` false negatives (MONAI's convention; beta > alpha favours
    recall). As MONAI, ``reduction="none"`` returns ``(B, n)`` (``(n,)`` with ``batch``), without the trailing
    spatial ones of DiceLoss; there is no class ``weight``.

    **Empty classes.** ``empty_target="smooth"`` (default, MONAI) gives an (item, class) with no target voxel
    ``1 - smooth_nr / (alpha sum p + smooth_dr)``, about 1 for any non-negligible prediction, even a correct,
    nearly empty one. ``empty_target="fp_rate"`` makes it the mean predicted probability over the valid voxels,
    ``sum_v w_v p_v / sum_v w_v`` (3e-7 per voxel costs ~3e-7, 1 everywhere costs 1, nothing valid costs 0).

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
        alpha, beta: false-positive / false-negative weights, >= 0 (0.5, 0.5 = Dice).
        soft_label: exact formulation for soft (non-binary) targets.

    Example:
        >>> import monai
        >>> from segloss.losses import TverskyLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
        >>> kw = dict(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7, reduction="none")
        >>> loss = TverskyLoss(**kw)(logits, label)
        >>> loss.shape, torch.allclose(loss, monai.losses.TverskyLoss(**kw)(logits, label))
        (torch.Size([2, 3]), True)
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
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
        self.alpha, self.beta = _check_ab(alpha, beta)
        self.soft_label = soft_label

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shapes as :meth:`segloss.losses.dice.DiceLoss.forward`."""
        return tversky_loss(
            input, target, weight_map, alpha=self.alpha, beta=self.beta, soft_label=self.soft_label, **self._common()
        )


class FocalTverskyLoss(TverskyLoss):
    r"""Focal Tversky loss (Abraham & Khan, ISBI 2019): per (item, class) ``f = (1 - TI)^gamma``, ``TI`` as in
    :class:`TverskyLoss`, then reduced (``"none"``: ``(B, n)``):

    .. math::

        f_{bc} = \begin{cases} (1 - \mathrm{TI}_{bc})^\gamma & 1 - \mathrm{TI}_{bc} > 10^{-7} \\
        (1 - \mathrm{TI}_{bc}) \, 10^{-7 (\gamma - 1)} & \text{otherwise} \end{cases}

    **Exponent convention:** ``gamma`` is the exponent itself. The paper writes ``(1 - TI)^(1/gamma_paper)`` and
    recommends ``gamma_paper = 4/3``, i.e. ``gamma = 0.75`` here (the default); ``gamma = 1`` is the Tversky loss.
    ``gamma < 1`` raises the loss (and, relative to Tversky, the gradient) of the classes already segmented
    well, per the paper; ``gamma > 1`` does the opposite. Below ``1 - TI = 1e-7`` the power is continued linearly
    (``(1 - TI) 1e-7^(gamma - 1)``), so a perfect prediction costs 0 with a finite gradient. Defaults follow the paper: ``alpha = 0.3`` (FP),
    ``beta = 0.7`` (FN), i.e. the paper's alpha = 0.7 on the false negatives.

    **Empty classes.** ``empty_target="smooth"`` (default, MONAI) gives an (item, class) with no target voxel
    ``1 - smooth_nr / (alpha sum p + smooth_dr)``, about 1 for any non-negligible prediction, even a correct,
    nearly empty one. ``empty_target="fp_rate"`` makes it the mean predicted probability over the valid voxels,
    ``sum_v w_v p_v / sum_v w_v`` (3e-7 per voxel costs ~3e-7, 1 everywhere costs 1, nothing valid costs 0). Under ``"fp_rate"`` the FP rate is used as is, not raised to ``gamma``.

    Args: as :class:`TverskyLoss`, plus ``gamma`` (> 0).

    Example:
        With MONAI's Tversky loss per (item, class):

        >>> import monai
        >>> from segloss.losses import FocalTverskyLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
        >>> kw = dict(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)
        >>> tversky = monai.losses.TverskyLoss(reduction="none", **kw)(logits, label)  # (B, C): 1 - TI
        >>> torch.allclose(FocalTverskyLoss(gamma=0.75, **kw)(logits, label), (tversky**0.75).mean())
        True
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 0.75,
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
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            alpha=alpha,
            beta=beta,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            soft_label=soft_label,
            ignore_index=ignore_index,
            sync_batch=sync_batch,
            empty_target=empty_target,
        )
        self.gamma = _check_gamma(gamma)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shapes as :meth:`segloss.losses.dice.DiceLoss.forward`."""
        return focal_tversky_loss(
            input,
            target,
            weight_map,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            soft_label=self.soft_label,
            **self._common(),
        )
