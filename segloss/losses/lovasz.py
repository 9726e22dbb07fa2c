"""Lovász-Softmax and Lovász hinge losses of Berman, Rannen Triki and Blaschko, "The Lovász-Softmax loss: a
tractable surrogate for the optimization of the intersection-over-union measure in neural networks", CVPR 2018.

For one class, let ``e`` be the per-voxel errors (``|g - p|`` of the probability, or the hinge ``1 - x (2g - 1)``
of the logit) and ``g`` the ground truth. The loss is the Lovász extension of the Jaccard loss
``Delta_J = 1 - |G ∩ P| / |G ∪ P|`` evaluated at ``e`` (Alg. 1 of the paper): sort ``e`` in decreasing order,
``e_(1) >= e_(2) >= ...``, and take ``sum_k e_(k) (J_k - J_{k-1})`` where ``J_k`` is the Jaccard loss of
predicting the first ``k`` sorted voxels wrong, with the cumulative counts ``c_k = sum_{j<=k} g_(j)``, the total
``G = sum g``, ``I_k = G - c_k`` and ``U_k = G + k - c_k``::

    J_k = 1 - I_k / U_k,      J_k - J_{k-1} = (g_(k) U_k + (1 - g_(k)) I_k) / (U_{k-1} U_k)   (1 when U_{k-1} = 0)

The closed form of the increment (instead of the difference of two ``J``) keeps every term accurate to float
precision on million-voxel vectors, where ``J_k - J_{k-1} ~ 1/N`` would otherwise cancel.

Vectorised: every (image, class) error vector is a row of one ``(R, N)`` tensor, sorted at once (rows are
``B * C`` with ``per_image`` and ``C`` otherwise), and the increments come from one cumulative sum. The sort keys
are the float bits of the non-negative errors read as integers, which order like the values. Ignored voxels get a key after every valid one and no ground truth, so they sit in
a tail that changes neither the intersection nor the union of any valid position, and their increment is zeroed:
the result equals the loss of the compacted vectors exactly (ties included), without copying them per class.

Opt-in approximation (``tolerance``): the sort is the main cost. Counting each row's errors into equal bins of
width <= ``tolerance`` (one histogram over all rows) fixes the decreasing order up to ties inside a bin, and the
increments of a bin telescope to the same sum in any order, so the loss stays within ``tolerance`` of the exact
one with no sort at all (:func:`~segloss.losses.lovasz_binned.binned_increments`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from segloss.losses.inputs import (
    Weight,
    activate,
    check_reduction,
    finite_loss,
    first_class,
    per_class_weight,
    prepare_target,
    safe_ratio,
    validate_act_args,
)
from segloss.losses.lovasz_binned import binned_increments, check_tolerance

__all__ = ["LovaszSoftmaxLoss", "lovasz_reduce", "lovasz_rows", "lovasz_softmax"]

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _LovaszExtension(torch.autograd.Function):
    """Lovász extension of the Jaccard loss, one value per row: ``errors`` ``(..., N)`` -> ``(...)``.

    Inputs: ``errors`` (differentiable, ``>= 0``); ``gt`` ``(..., N)`` the ground truth, bool (binary: exact integer
    counts) or float (soft: counts accumulated in float64), 0 at ignored voxels; ``valid`` bool broadcastable to
    ``errors`` (False = ignored) or None. Returns the per-row loss and, not differentiable, the per-row
    ground-truth total ``G``. The backward pass gives each voxel the increment of its sorted position.

    The rows are sorted *ascending*, so the decreasing order of the paper
    is read from the end: the voxel at ascending position ``j`` has rank ``k = N - j``, ``I_k = G - c_k`` is the
    exclusive cumulative sum of ``gt`` up to ``j`` and ``U_k = k + I_k``. Ignored voxels get the key -1, below every
    error, i.e. last in decreasing order.
    """

    @staticmethod
    def forward(ctx, errors, gt, valid, tolerance=None):
        N = errors.shape[-1]
        if tolerance is not None:
            binned = binned_increments(errors, gt, valid, tolerance)
            if binned is not None:
                inc, total = binned
                if ctx.needs_input_grad[0]:
                    ctx.save_for_backward(inc)
                ctx.mark_non_differentiable(total)
                return torch.linalg.vecdot(errors, inc), total
        # Non-negative floats order like their bits read as integers (a -0.0, read as the lowest key, sorts last in
        # decreasing order, where an error 0 belongs).
        keys = errors.view(_INT_OF_WIDTH[errors.element_size()])
        if valid is not None:
            keys = keys.masked_fill(~valid, -1)
        perm = torch.sort(keys, dim=-1, stable=True).indices
        ignored = None if valid is None else (~valid).expand(errors.shape).gather(-1, perm)
        g = gt.expand(errors.shape).gather(-1, perm)
        rank = torch.arange(N, 0, -1, device=errors.device, dtype=errors.dtype)  # k = N - j
        if g.dtype == torch.bool:
            # counts are whole numbers: a float cumsum is exact up to 2 / eps (2**24 in float32)
            if N <= 2 / torch.finfo(errors.dtype).eps:
                inter = g.cumsum(-1, dtype=errors.dtype)
            else:
                inter = g.cumsum(-1, dtype=torch.int64).to(errors.dtype)
            total = inter[..., -1].clone()
            # I_k = count - g and U_k = k + I_k. g = 0: U grows by one, the increment is I / (U (U - 1)); g = 1: I drops
            # by one and U stays, 1 / U. With I, U the g = 0 expressions (I = count): (g ? 1 : I / U) / (U - 1).
            union = inter + rank
            inc = inter.div_(union).masked_fill_(g, 1.0).div_(union.sub_(1))  # buffers reused in place
            # U_k = 1 with g = 0 only at k = 1 of a row without ground truth (0/0 above): J jumps from 0 to 1
            inc[..., -1].masked_fill_(total == 0, 1.0)
        else:
            g = g.to(errors.dtype)
            count = g.cumsum(-1, dtype=torch.float64)
            total = count[..., -1].to(errors.dtype)
            inter = (count - g).to(errors.dtype)
            union = inter + rank
            union_prev = union - (1 - g)
            num = g * union + (1 - g) * inter
            inc = torch.where(union_prev > 0, num / (union_prev * union), 1.0)
        if ignored is not None:
            inc.masked_fill_(ignored, 0.0)  # ignored voxels: no increment, no gradient
        if ctx.needs_input_grad[0]:
            # each voxel's increment in input order is the gradient; the loss is then a dot product in input order
            # too, with no gather of the sorted errors
            inc = torch.empty_like(inc).scatter_(-1, perm, inc)
            ctx.save_for_backward(inc)
            loss = torch.linalg.vecdot(errors, inc)
        else:
            loss = torch.linalg.vecdot(errors.gather(-1, perm), inc)
        ctx.mark_non_differentiable(total)
        return loss, total

    @staticmethod
    def backward(ctx, grad_loss, grad_total):
        # inc is a constant of the errors: this product is also the exact graph for second derivatives
        (inc,) = ctx.saved_tensors
        return inc * grad_loss.unsqueeze(-1), None, None, None


def _selected_classes(classes: str | Sequence[int], C: int, start: int) -> tuple[list[int], bool]:
    """The class indices whose losses are averaged, and whether only the present ones count."""
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(f'`classes` must be "present", "all" or a list of class indices, got {classes!r}.')
        return list(range(start, C)), classes == "present"
    sel = [int(c) for c in classes]
    if not sel or len(set(sel)) != len(sel) or any(c < start or c >= C for c in sel):
        raise ValueError(
            f"`classes` must list distinct class indices in [{start}, {C}) (include_background="
            f"{not start}), got {list(classes)}."
        )
    return sel, False


def lovasz_reduce(
    row_loss: torch.Tensor,
    used: torch.Tensor,
    class_weight: torch.Tensor | None,
    per_image: bool,
    reduction: str,
) -> torch.Tensor:
    """Weighted mean over the used classes ``(B, n)`` / ``(n,)`` -> per image ``(B,)`` / one value, then reduced.

    An image with no used class (or zero weight on all of them) is left out of the mean over images.
    """
    w = used.to(row_loss.dtype)
    if class_weight is not None:
        w = w * class_weight
    wsum = w.sum(-1)
    value = safe_ratio((w * row_loss).sum(-1), wsum)
    if not per_image:
        return value.reshape(1) if reduction == "none" else value
    if reduction == "none":
        return value
    if reduction == "sum":
        return value.sum()
    return value.sum() / (wsum > 0).sum().clamp_min(1)  # images counted; 1 if none (every value is 0 then)


def lovasz_rows(
    errors: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None, per_image: bool, tolerance: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lovász extension per (image, class) ``(B, n)`` or per class over the batch ``(n,)``, the ground-truth
    totals (same shape) and the valid-voxel counts (None if nothing is ignored).

    ``errors`` and ``gt`` ``(B, n, N)`` (``gt`` bool or float, 0 at ignored voxels); ``valid`` ``(B, 1 or n, N)``
    bool or None.
    """
    B, n, N = errors.shape
    if not per_image:  # each class's voxels of the whole batch form one row: (n, B*N)
        errors = errors.transpose(0, 1).reshape(n, B * N)
        gt = gt.transpose(0, 1).reshape(n, B * N)
        if valid is not None:
            valid = valid.transpose(0, 1).reshape(valid.shape[1], B * N)
    loss, total = _LovaszExtension.apply(errors, gt, valid, tolerance)
    count = None if valid is None else valid.sum(-1).expand(total.shape)
    return loss, total, count


@finite_loss
def lovasz_softmax(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    sigmoid: bool = False,
    softmax: bool | None = None,
    other_act: Callable | None = None,
    classes: str | Sequence[int] = "present",
    per_image: bool = False,
    ignore_index: int | None = None,
    weight: Weight = None,
    reduction: str = "mean",
    tolerance: float | None = None,
) -> torch.Tensor:
    """Functional form of :class:`LovaszSoftmaxLoss` (same arguments; see there for shapes, maths and conventions)."""
    reduction = check_reduction(reduction)
    tolerance = check_tolerance(tolerance)
    if softmax is None:
        softmax = not sigmoid and other_act is None
    validate_act_args(sigmoid, softmax, other_act)
    tgt = prepare_target(input, target, to_onehot_y=to_onehot_y, ignore_index=ignore_index)
    B, C = input.shape[:2]
    start = first_class(include_background, C)
    sel, present = _selected_classes(classes, C, start)
    with torch.autocast(input.device.type, enabled=False):
        cw = per_class_weight(weight, "weight", C - start, input.device)
        p = activate(input, sigmoid, softmax, other_act).reshape(B, C, -1)
        idx = torch.tensor(sel, device=p.device)
        every = sel == list(range(C))
        ps = p if every else p.index_select(1, idx)
        valid = None if tgt.weight is None else tgt.weight > 0
        if valid is not None and valid.shape[1] > 1:
            valid = valid.index_select(1, idx)
        if tgt.labels is not None:
            labels = tgt.labels if valid is None else tgt.labels.masked_fill(~valid[:, 0], -1)
            g = labels.unsqueeze(1) == idx.view(1, -1, 1)  # (B, n, N) bool, False at ignored voxels
        else:
            g = tgt.dense if every else tgt.dense.index_select(1, idx)
            if valid is not None:
                g = g * valid
        if g.dtype == torch.bool:
            errors = torch.where(g, 1 - ps, ps)
            if not (softmax or sigmoid):  # probabilities not ours may leave [0, 1]: keep the errors |g - p|
                errors = errors.abs()
        else:
            errors = (ps - g).abs()
        loss, total, count = lovasz_rows(errors, g, valid, per_image, tolerance)
        used = total > 0 if present else torch.ones_like(total, dtype=torch.bool)
        if count is not None:
            used = used & (count > 0)
        if cw is not None:
            cw = cw.index_select(0, idx - start)
        return lovasz_reduce(loss, used, cw, per_image, reduction)


class LovaszSoftmaxLoss(nn.Module):
    r"""Lovász-Softmax loss (Berman et al., CVPR 2018): a convex surrogate of the mean Jaccard loss (1 - IoU).

    For probabilities ``p`` ``(B, C, *spatial)`` (the softmax of the logits by default) and ground truth ``g``
    (one-hot, or the label map standing for it), the loss of class ``c`` over a set of voxels is the Lovász
    extension of its Jaccard loss at the errors ``e_v = |g_vc - p_vc|`` (see the module docstring for the sorted
    increments), computed for all (image, class) pairs by one batched sort. Any number of spatial dims:

    .. math::

        l_c = \sum_{k=1}^{N} e_{(k)} \, (J_k - J_{k-1}), \qquad J_k = 1 - \frac{G - c_k}{G + k - c_k}

        \mathcal{L} = \frac{\sum_c w_c \, l_c}{\sum_c w_c}

    with the errors sorted decreasingly, ``e_(1) >= ... >= e_(N)`` over the ``N`` valid voxels, ``c_k`` the sum of
    ``g_vc`` over the first ``k`` of them, ``G = sum_v g_vc``, ``J_0 = 0``, and the sum over the classes used (their
    ``weight``, 1 without one), per image with ``per_image`` (then averaged over the images), else over the voxels
    of the whole batch.

    Conventions:

    - ``per_image=False`` (default, the paper's setting for batches): each class is scored once over the voxels of
      the whole batch, and the loss is the weighted mean over the classes used. ``per_image=True``: each image gets
      the weighted mean over its classes used, and the loss is the mean over images.
    - classes used: ``classes="present"`` (default, as the paper's code) takes the classes present in the ground
      truth (of the image, with ``per_image``, else of the batch); an absent class contributes nothing. ``"all"``
      takes every class (an absent class then costs its largest probability); a list takes those class indices.
    - ``include_background=False`` drops class 0 from the classes averaged, but its voxels remain negatives of the
      other classes (and the softmax still runs over all channels).
    - ``weight`` (one value per channel, ``C``, or ``C - 1`` without background; a scalar is broadcast) weighs each
      class's loss, normalised by the sum of the weights of the classes used: ``sum_c w_c l_c / sum_c w_c``.
    - ``ignore_index`` voxels are left out exactly, as if removed from the volume. An image with no class used (all
      its voxels ignored, or no selected class present) is left out of the per-image mean; if every image is, the
      loss is 0 with a zero gradient.
    - ``reduction``: ``"mean"`` as above; ``"sum"`` sums the per-image losses (``per_image``) and equals ``"mean"``
      otherwise; ``"none"`` returns the per-image losses ``(B,)`` (0 for images left out), or the batch loss as
      shape ``(1,)`` without ``per_image``.

    Activation follows MONAI's names: ``softmax=None`` (default) means softmax over the channels unless
    ``sigmoid=True`` or ``other_act`` is given, so logits go in as in the paper; ``softmax=False`` with neither
    takes ``input`` as probabilities. For one channel use ``sigmoid=True`` (or :class:`LovaszHingeLoss`); the target
    is then a binary mask ``(B, 1, *)`` / ``(B, *)``. Targets: a label map ``(B, 1, *)`` / ``(B, *)`` (never expanded
    to one-hot) or a dense ``(B, C, *)`` one-hot / soft target. Computed in float32 with autocast off. No
    ``weight_map``: the Lovász extension is defined for sets of voxels, not weighted voxels.

    ``tolerance`` (opt-in, default None = exact): instead of sorting, the errors of each row are counted into equal
    bins of width <= ``tolerance`` (``ceil(max error / tolerance)`` bins), which costs a histogram instead of a sort.
    The loss is then within ``tolerance`` (absolute) of the exact loss, for every class and so for every mean (see
    ``binned_increments``); its gradient gives the voxels of one bin the mean increment of two tie-breaking orders
    (foreground first / background first). The bin edges depend on the data, so the values are read back to the
    host once. Soft (non-binary) targets, and calls where the bins would outnumber a row's voxels, use the exact
    sort.

    Args:
        include_background: if False, class 0 is not among the classes averaged (see above).
        to_onehot_y: read the target as a label map (MONAI's name; a ``(B, 1, *)`` target with ``C > 1`` channels
            is read as a label map anyway).
        sigmoid, softmax, other_act: activation (see above).
        classes: ``"present"``, ``"all"`` or a list of class indices (not 0 with ``include_background=False``).
        per_image: score each image separately, then average over images.
        ignore_index: label (or dense-target value, see :func:`~segloss.losses.inputs.prepare_target`) of the
            voxels to leave out.
        weight: class weights (see above), finite and >= 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (see above).
        tolerance: None for the exact loss, or the largest allowed deviation from it (see above; softmax errors
            lie in [0, 1], so ``1e-3`` means 1000 bins).

    Example:
        At a hard (one-hot) prediction the loss is the mean Jaccard loss ``1 - IoU`` of the classes present:

        >>> import torch.nn.functional as F
        >>> from segloss.losses import LovaszSoftmaxLoss
        >>> _ = torch.manual_seed(0)
        >>> label, pred = torch.randint(0, 3, (2, 1, 8, 8)), torch.randint(0, 3, (2, 8, 8))  # 3D: (B,1,D,H,W)
        >>> probs = F.one_hot(pred, 3).movedim(-1, 1).float()
        >>> p, g = probs.bool(), F.one_hot(label[:, 0], 3).movedim(-1, 1).bool()
        >>> iou = (p & g).sum((0, 2, 3)) / (p | g).sum((0, 2, 3))
        >>> torch.allclose(LovaszSoftmaxLoss(softmax=False)(probs, label), 1 - iou.mean())
        True
        >>> label[:, :, :2] = 255  # ignored voxels; logits in, per-image losses out
        >>> loss = LovaszSoftmaxLoss(per_image=True, ignore_index=255, reduction="none")
        >>> loss(torch.randn(2, 3, 8, 8), label).shape
        torch.Size([2])
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool | None = None,
        other_act: Callable | None = None,
        classes: str | Sequence[int] = "present",
        per_image: bool = False,
        ignore_index: int | None = None,
        weight: Weight = None,
        reduction: str = "mean",
        tolerance: float | None = None,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.tolerance = check_tolerance(tolerance)
        validate_act_args(sigmoid, bool(softmax), other_act)
        if isinstance(classes, str):
            _selected_classes(classes, 1, 0)  # the class range is checked against the input in forward
        else:
            classes = [int(c) for c in classes]
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.classes = classes
        self.per_image = per_image
        self.ignore_index = ignore_index
        self.register_buffer("class_weight", per_class_weight(weight, "weight"))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (or probabilities, see the activation options) ``(B, C, *spatial)``.
            target: label map ``(B, 1, *)`` / ``(B, *)`` (integer, or float holding whole numbers) or a dense
                ``(B, C, *)`` one-hot / soft target.
        """
        return lovasz_softmax(
            input,
            target,
            include_background=self.include_background,
            to_onehot_y=self.to_onehot_y,
            sigmoid=self.sigmoid,
            softmax=self.softmax,
            other_act=self.other_act,
            classes=self.classes,
            per_image=self.per_image,
            ignore_index=self.ignore_index,
            weight=self.class_weight,
            reduction=self.reduction,
            tolerance=self.tolerance,
        )
