"""Lovász hinge loss of Berman, Rannen Triki and Blaschko (CVPR 2018): the Lovász extension of the binary Jaccard
loss at the hinge errors of the logits, per channel; the sort and increments are those of
:mod:`segloss.losses.lovasz`."""

from __future__ import annotations

import torch
from torch import nn

from segloss.losses.inputs import _plain, check_reduction, finite_loss, input_checks_enabled, prepare_target
from segloss.losses.lovasz import lovasz_reduce, lovasz_rows
from segloss.losses.lovasz_binned import check_tolerance

__all__ = ["LovaszHingeLoss", "lovasz_hinge"]


@finite_loss
def lovasz_hinge(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    per_image: bool = False,
    ignore_index: int | None = None,
    reduction: str = "mean",
    tolerance: float | None = None,
) -> torch.Tensor:
    """Functional form of :class:`LovaszHingeLoss` (same arguments; see there for shapes, maths and conventions)."""
    reduction = check_reduction(reduction)
    tolerance = check_tolerance(tolerance)
    tgt = prepare_target(input, target, ignore_index=ignore_index)
    B, C = input.shape[:2]
    with torch.autocast(input.device.type, enabled=False):
        x = _plain(input).float().reshape(B, C, -1)
        valid = None if tgt.weight is None else tgt.weight > 0
        if tgt.labels is not None:  # class indices: channel c is the one-vs-rest mask of class c
            labels = tgt.labels if valid is None else tgt.labels.masked_fill(~valid[:, 0], -1)
            g = labels.unsqueeze(1) == torch.arange(C, device=x.device).view(1, C, 1)
            errors = torch.where(g, 1 - x, 1 + x)
        else:
            g = tgt.dense
            if input_checks_enabled():
                lo, hi = torch.aminmax(g)
                if float(lo) < 0 or float(hi) > 1:
                    raise ValueError(
                        f"`target` of the Lovász hinge must lie in [0, 1], found [{float(lo)}, {float(hi)}]."
                    )
            if valid is not None:
                g = g * valid
            errors = 1 - x * (2 * g - 1)
        # relu of the hinge: voxels with a non-positive hinge add nothing and sort after the others either way
        loss, total, count = lovasz_rows(errors.relu_(), g, valid, per_image, tolerance)
        used = torch.ones_like(total, dtype=torch.bool) if count is None else count > 0
        return lovasz_reduce(loss, used, None, per_image, reduction)


class LovaszHingeLoss(nn.Module):
    r"""Lovász hinge loss (Berman et al., CVPR 2018): a convex surrogate of the binary Jaccard loss, on logits.

    For logits ``x`` and a binary ground truth ``g`` with signs ``s = 2g - 1``, the errors are the hinges
    ``e_v = max(0, 1 - x_v s_v)`` and the loss is the Lovász extension of the Jaccard loss of the foreground at
    ``e`` (see the module docstring). Zero when every logit is on its correct side with margin >= 1. Per channel
    ``c`` (over the valid voxels of an image with ``per_image``, else of the whole batch):

    .. math::

        e_v = \max(0, 1 - x_{vc} \, (2 g_{vc} - 1)), \qquad l_c = \sum_{k=1}^{N} e_{(k)} \, (J_k - J_{k-1})

        \mathcal{L} = \frac{1}{n} \sum_c l_c

    with ``e_(1) >= ... >= e_(N)``, ``J_k`` the Jaccard loss of the first ``k`` sorted voxels (``J_0 = 0``, as in
    :class:`LovaszSoftmaxLoss`) and ``n`` the channels with a valid voxel.

    - Binary: one channel ``(B, 1, *)`` with a ``(B, 1, *)`` / ``(B, *)`` mask in {0, 1}.
    - Multi-label: ``C`` channels with a dense ``(B, C, *)`` target (or a label map, meaning the one-vs-rest masks of
      the classes): each channel is its own binary problem with its own hinge, and the channel losses are
      averaged (not one hinge over all channels lumped together).
    - ``per_image=False`` (default): each channel is scored over the voxels of the whole batch. ``per_image=True``:
      per image (mean over its channels), then the mean over images, as the paper's ``per_image``. Every channel
      counts, present or not (an empty foreground costs the largest hinge of its false positives).
    - ``ignore_index`` voxels (elements, for a dense target) are left out exactly; a channel with every voxel
      ignored is left out of the mean, as is an image with every voxel ignored; if all are, the loss is 0.
    - ``reduction``: ``"mean"``; ``"sum"`` sums the per-image losses with ``per_image``; ``"none"`` gives the
      per-image losses ``(B,)``, or shape ``(1,)`` without ``per_image``.

    Computed in float32 with autocast off, any number of spatial dims.

    ``tolerance`` (opt-in, default None = exact): the binned approximation of :class:`LovaszSoftmaxLoss`, within
    ``tolerance`` of the exact loss, no sort.

    Args:
        per_image: score each image separately, then average over images.
        ignore_index: label (or dense-target value) of the voxels to leave out.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        tolerance: None for the exact loss, or the largest allowed deviation from it (hinge errors are not bounded:
            the number of bins is the largest hinge divided by ``tolerance``).

    Example:
        With logits of +-1 the hinges are 0 (right) or 2 (wrong), and the loss is twice the Jaccard loss:

        >>> from segloss.losses import LovaszHingeLoss
        >>> _ = torch.manual_seed(0)
        >>> mask, pred = torch.rand(2, 1, 8, 8) > 0.5, torch.rand(2, 1, 8, 8) > 0.5
        >>> iou = (pred & mask).sum() / (pred | mask).sum()
        >>> torch.allclose(LovaszHingeLoss()(2 * pred.float() - 1, mask.float()), 2 * (1 - iou))
        True
    """

    def __init__(
        self,
        per_image: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
        tolerance: float | None = None,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.tolerance = check_tolerance(tolerance)
        self.per_image = per_image
        self.ignore_index = ignore_index

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, *spatial)``.
            target: binary mask(s) ``(B, C, *)`` (``(B, *)`` for ``C = 1``) or a label map for ``C > 1``.
        """
        return lovasz_hinge(
            input,
            target,
            per_image=self.per_image,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            tolerance=self.tolerance,
        )
