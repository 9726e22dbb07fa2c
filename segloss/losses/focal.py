"""Focal loss of Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, as MONAI's ``FocalLoss``.

``FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t`` down-weights the well-classified voxels (``p_t`` near 1) so that
training concentrates on the hard ones. By default every number (value, gradient, every reduction and the
``ignore_index`` / ``include_background`` conventions) equals MONAI 1.6.1's ``monai.losses.FocalLoss``; MONAI's odd
conventions are documented on :class:`FocalLoss` and each has an opt-out.

Softmax focal with an integer label map is fused: one ``log_softmax``, ``log p_t`` gathered at the label (no
one-hot), and a closed-form backward from the saved log-probabilities (:class:`_SoftmaxFocalAtLabel`), so it
costs about one ``F.cross_entropy`` instead of MONAI's one-hot tensor plus several full-size intermediates.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from segloss.losses.cross_entropy import Weight, checked_buffer, per_class_vector, safe_ratio
from segloss.losses.inputs import Target, _plain, check_finite, check_reduction, prepare_target

__all__ = ["FocalLoss", "focal_loss"]


class _SoftmaxFocalAtLabel(torch.autograd.Function):
    """Per-voxel softmax focal term at the label: logits ``(B, C, N)``, labels ``(B, N)`` -> ``(B, N)``.

    Forward: ``f(p_t) = -(1 - p_t)^gamma log p_t`` with ``log p = log_softmax(x)``. Backward in closed form,
    saving only ``log p`` (as ``F.cross_entropy`` does)::

        df/dx_c = p_t f'(p_t) ([c == t] - p_c),   p f'(p) = (1 - p)^gamma (gamma p log(p) / (1 - p) - 1)

    where ``log(p) / (1 - p) -> -1`` as ``p -> 1`` (so ``gamma < 1`` stays finite), and ``1 - p_t`` is
    ``-expm1(log p_t)``, accurate near ``p_t = 1``. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
        logp = torch.log_softmax(logits, 1)
        logp_t = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logp, labels, logp_t)
        ctx.gamma = gamma
        return -(-torch.expm1(logp_t)).pow(gamma) * logp_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logp, labels, logp_t = ctx.saved_tensors
        gamma = ctx.gamma
        q = -torch.expm1(logp_t)  # 1 - p_t
        log_ratio = torch.where(q > 0, logp_t / q, -1.0)
        coef = grad * q.pow(gamma) * (gamma * logp_t.exp() * log_ratio - 1)  # grad * p_t f'(p_t)
        grad_logits = logp.exp().mul_(-coef.unsqueeze(1))
        grad_logits.scatter_add_(1, labels.unsqueeze(1), coef.unsqueeze(1))
        return grad_logits, None, None


def _binary_focal(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """``softplus(z) sigmoid(z)^gamma``: the sigmoid focal term of an element whose target pushes its logit
    towards -inf (``z = x`` for a negative, ``z = -x`` for a positive), as MONAI (``exp(gamma logsigmoid(z))``)."""
    loss = F.softplus(z)
    return loss if gamma == 0 else loss * torch.exp(gamma * F.logsigmoid(z))


def _pad(vec: torch.Tensor | None, n: int, start: int, like: torch.Tensor) -> torch.Tensor:
    """Per-label factors over all ``C = start + n`` labels: ``vec`` (ones if None) after ``start`` zeros, so
    that indexing with a label map also drops the background voxels when ``start == 1``."""
    vec = like.new_ones(n) if vec is None else vec
    return torch.cat([vec.new_zeros(start), vec]) if start else vec


def _times(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a * b


def _softmax_focal(
    x: torch.Tensor, tgt: Target, gamma: float, start: int, over_all: bool, factor: torch.Tensor | None, none: bool
) -> torch.Tensor:
    """Softmax focal loss ``(B, n, N)`` (``(B, 1, N)`` summed over channels for a label map unless ``none``),
    times the per-channel ``factor`` (alpha times class weight), for logits ``x`` ``(B, C, N)``."""
    n = x.shape[1] - start
    own_softmax = start and not over_all  # MONAI: softmax over the foreground channels only
    if tgt.labels is not None:
        t = tgt.labels
        idx = (t - start).clamp_min(0)  # channel among the n used ones; background voxels are zeroed below
        loss = _SoftmaxFocalAtLabel.apply(x[:, start:] if own_softmax else x, idx if own_softmax else t, gamma)
        if factor is not None or start:
            loss = loss * _pad(factor, n, start, x)[t]
        loss = loss.unsqueeze(1)
        return loss.new_zeros(x.shape[0], n, x.shape[2]).scatter(1, idx.unsqueeze(1), loss) if none else loss
    logp = torch.log_softmax(x[:, start:], 1) if own_softmax else torch.log_softmax(x, 1)[:, start:]
    loss = -(1 - logp.exp()).pow(gamma) * logp * tgt.dense[:, start:]
    return loss if factor is None else loss * factor.view(n, 1)


def _sigmoid_focal(
    x: torch.Tensor,
    tgt: Target,
    gamma: float,
    start: int,
    alpha: float | torch.Tensor | None,
    cw: torch.Tensor | None,
    none: bool,
) -> torch.Tensor:
    """Sigmoid (per-channel binary) focal loss ``(B, n, N)`` (``(B, 1, N)`` for a label map unless ``none``).

    MONAI's alpha: a scalar weighs positives ``alpha`` and negatives ``1 - alpha``; a per-class alpha weighs the
    positives (target exactly 1) of class c by ``alpha_c`` and the negatives by 1.
    """
    xs = x[:, start:]
    n = xs.shape[1]
    if tgt.dense is not None:
        g = tgt.dense[:, start:]
        loss = xs - xs * g - F.logsigmoid(xs)  # BCE with logits
        if gamma != 0:
            loss = torch.exp(gamma * F.logsigmoid(xs * (1 - 2 * g))) * loss
        if isinstance(alpha, float):
            loss = loss * (g * alpha + (1 - g) * (1 - alpha))
        elif alpha is not None:
            loss = loss * torch.where(g == 1, alpha.view(n, 1), 1.0)
        return loss if cw is None else loss * cw.view(n, 1)
    # Label map: every channel is a negative, the label channel swaps its negative term for a positive one.
    if isinstance(alpha, float):
        pos, neg = _times(xs.new_full((n,), alpha), cw), _times(xs.new_full((n,), 1 - alpha), cw)
    else:
        pos, neg = _times(alpha, cw), cw
    t = tgt.labels
    idx = (t - start).clamp_min(0).unsqueeze(1)
    x_t = xs.gather(1, idx)
    correction = _pad(pos, n, start, xs)[t].unsqueeze(1) * _binary_focal(-x_t, gamma)
    correction = correction - _pad(neg, n, start, xs)[t].unsqueeze(1) * _binary_focal(x_t, gamma)
    loss = _binary_focal(xs, gamma)
    if neg is not None:
        loss = loss * neg.view(n, 1)
    return loss.scatter_add(1, idx, correction) if none else loss.sum(1, keepdim=True) + correction


def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None = None,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    gamma: float = 2.0,
    alpha: Weight = None,
    weight: Weight = None,
    reduction: str = "mean",
    use_softmax: bool = False,
    ignore_index: int | None = None,
    softmax_over_all_channels: bool = False,
    average_spatial_dims: bool = True,
    ce_mean: bool = False,
) -> torch.Tensor:
    """Functional form of :class:`FocalLoss` (same arguments; see there for shapes, maths and conventions)."""
    reduction = check_reduction(reduction)
    gamma = float(gamma)
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"`gamma` must be finite and >= 0, got {gamma}.")
    if alpha is not None and (isinstance(alpha, (int, float)) or (torch.is_tensor(alpha) and alpha.ndim == 0)):
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"A scalar `alpha` must lie in [0, 1], got {alpha}.")
    check_finite(input, "input")
    tgt = prepare_target(input, target, to_onehot_y=to_onehot_y, ignore_index=ignore_index, weight_map=weight_map)
    B, C = input.shape[:2]
    start = 0
    if not include_background:
        if C == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
        else:
            start = 1
    n = C - start
    if use_softmax and start and isinstance(alpha, float) and not softmax_over_all_channels:
        warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=3)
        alpha = None
    none = reduction == "none"
    with torch.autocast(input.device.type, enabled=False):
        x = _plain(input).float().reshape(B, C, -1)
        N = x.shape[-1]
        cw = per_class_vector(weight, n, "weight", x.device)
        if not isinstance(alpha, float):
            alpha = per_class_vector(alpha, n, "alpha", x.device)
        if use_softmax:
            if isinstance(alpha, float):  # MONAI: 1 - alpha for the background channel, alpha for the others
                full = x.new_full((C,), alpha)
                full[0] = 1 - alpha
                alpha = full[start:]
            loss = _softmax_focal(x, tgt, gamma, start, softmax_over_all_channels, _times(alpha, cw), none)
        else:
            loss = _sigmoid_focal(x, tgt, gamma, start, alpha, cw, none)
        w = tgt.weight
        if w is not None:
            w = w[:, start:] if w.shape[1] > 1 else w
            loss = loss * w
        if none:
            return loss.reshape(B, n, *tgt.spatial_shape)
        if reduction == "sum":
            if not average_spatial_dims:
                return loss.sum()
            return safe_ratio(loss.sum(-1), N if w is None else w.sum(-1)).sum()
        # "mean": divide by the (weighted) voxel count times k channels (see FocalLoss)
        k = 1 if (use_softmax and ce_mean) or (ignore_index is not None and not ce_mean) else n
        voxels = B * N if w is None else w.sum() / w.shape[1]
        return safe_ratio(loss.sum(), k * voxels)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017), a drop-in for MONAI 1.6.1's ``monai.losses.FocalLoss``.

    For logits ``x`` ``(B, C, *spatial)`` and target ``g`` (one-hot / soft / multi-label, or a label map standing
    for one-hot channels), per element (voxel v, channel c)::

        sigmoid (default):  l_vc = alpha_vc (1 - p_t)^gamma BCE(x_vc, g_vc),  p_t = sigmoid(x) if g = 1 else 1 - sigmoid(x)
        softmax:            l_vc = -alpha_c (1 - p_vc)^gamma log(p_vc) g_vc,   p_v = softmax(x_v)

    times the class ``weight`` ``w_c`` and the voxel weight ``v_v`` (0 at ``ignore_index``, times ``weight_map``).
    ``gamma = 0`` gives plain (alpha-weighted) cross-entropy. Alpha (MONAI's conventions): sigmoid, scalar:
    ``alpha`` for positives, ``1 - alpha`` for negatives; sigmoid, per class: ``alpha_c`` for positives (target
    exactly 1), 1 for negatives; softmax, scalar: ``1 - alpha`` for channel 0 and ``alpha`` for the others;
    softmax, per class: ``alpha_c``. Per-class ``alpha`` and ``weight`` have one entry per channel used (``C - 1``
    with ``include_background=False``).

    Reductions (with ``n`` channels used, ``V`` = sum of voxel weights, ``B N`` without weights or ignore):

    - ``"none"``: ``(B, n, *spatial)``, as MONAI (for a label map the loss sits in the label's channel).
    - ``"mean"``: ``sum l / (n V)``; but when ``ignore_index`` is set MONAI divides by ``V`` alone (the number of
      non-ignored voxels, no factor ``n``), so merely setting ``ignore_index`` multiplies the loss by ``n``. This
      is reproduced; ``ce_mean=True`` instead always divides like the cross-entropy that ``gamma = 0`` reduces to:
      by ``V`` for softmax (``F.cross_entropy``) and by ``n V`` for sigmoid (``BCEWithLogitsLoss``).
    - ``"sum"``: MONAI first *averages* over the spatial dims per (sample, channel) (``sum_v l / V_b``), then sums
      over samples and channels; ``average_spatial_dims=False`` gives the plain sum of all elements.

    So ``weight_map`` is normalised (a map of 2s changes nothing), like an ignore mask with soft values, while
    the class ``weight`` scales the loss (MONAI). With everything ignored the result is 0 with a zero gradient.

    Other MONAI conventions kept:

    - ``use_softmax`` with ``include_background=False``: MONAI drops channel 0 *before* the softmax, i.e. the
      probabilities are a softmax over the foreground channels only, and background voxels of a label map
      contribute nothing. ``softmax_over_all_channels=True`` takes the softmax over all ``C`` channels and then
      drops channel 0 (the background logit still competes). In MONAI's mode a scalar ``alpha`` is ignored with
      a warning; with ``softmax_over_all_channels`` it weighs every foreground channel by ``alpha``.
    - ``ignore_index`` on a label map masks those voxels (MONAI: ``to_onehot_y=True``). On a dense target it
      follows :func:`~segloss.losses.inputs.prepare_target`: a class index masks the voxels of that class (as
      MONAI); another (sentinel) value masks the elements equal to it, whereas MONAI masks the voxels whose
      channels are all zero (except for one-channel targets, where both mask the sentinel's elements).

    Beyond MONAI: a ``(B, 1, *)`` label map is accepted with ``C > 1`` channels without ``to_onehot_y``; label
    maps are never expanded to one-hot; ``weight_map`` in :meth:`forward`; float32 maths under autocast.

    Args:
        include_background: if False, channel 0 is left out of the loss (one channel is always used).
        to_onehot_y: read the target as a label map of class indices (MONAI's name).
        gamma: focusing exponent, >= 0 (2 in the paper).
        alpha: scalar in [0, 1] or one value per channel used (see above); None for no alpha weighting.
        weight: class weight, scalar or one value per channel used, >= 0; scales each channel's loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (see above).
        use_softmax: softmax focal loss (one class per voxel) instead of per-channel sigmoid.
        ignore_index: label (or dense-target value) whose voxels are left out.
        softmax_over_all_channels: see ``include_background`` above (default False = MONAI).
        average_spatial_dims: MONAI's spatial averaging in ``"sum"`` (default True = MONAI).
        ce_mean: cross-entropy-like normalisation of ``"mean"`` (default False = MONAI).

    Example::

        loss = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)
        value = loss(logits, label)  # logits (B,C,D,H,W), label (B,1,D,H,W) integer
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: Weight = None,
        weight: Weight = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
        *,
        softmax_over_all_channels: bool = False,
        average_spatial_dims: bool = True,
        ce_mean: bool = False,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.gamma = float(gamma)
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"`gamma` must be finite and >= 0, got {gamma}.")
        alpha_t = checked_buffer(alpha, "alpha")
        if alpha_t is not None and alpha_t.ndim == 0:
            self.alpha = float(alpha_t)
            if self.alpha > 1:
                raise ValueError(f"A scalar `alpha` must lie in [0, 1], got {self.alpha}.")
        elif alpha_t is not None:
            self.register_buffer("alpha", alpha_t)
        else:
            self.alpha = None
        self.register_buffer("class_weight", checked_buffer(weight, "weight"))
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.use_softmax = use_softmax
        self.ignore_index = ignore_index
        self.softmax_over_all_channels = softmax_over_all_channels
        self.average_spatial_dims = average_spatial_dims
        self.ce_mean = ce_mean

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, *spatial)``, 2D or 3D.
            target: dense ``(B, C, *)`` (one-hot / soft / multi-label) or a label map ``(B, 1, *)`` / ``(B, *)``
                (integer, or float holding whole numbers).
            weight_map: optional non-negative voxel weights ``(B, 1, *)`` / ``(B, *)``, or ``(B, C, *)`` with a
                dense target.
        """
        return focal_loss(
            input,
            target,
            weight_map,
            include_background=self.include_background,
            to_onehot_y=self.to_onehot_y,
            gamma=self.gamma,
            alpha=self.alpha,
            weight=self.class_weight,
            reduction=self.reduction,
            use_softmax=self.use_softmax,
            ignore_index=self.ignore_index,
            softmax_over_all_channels=self.softmax_over_all_channels,
            average_spatial_dims=self.average_spatial_dims,
            ce_mean=self.ce_mean,
        )
