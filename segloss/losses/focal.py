"""Focal loss of Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, as MONAI's ``FocalLoss``.

``FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t`` down-weights the well-classified voxels (``p_t`` near 1) so that
training concentrates on the hard ones. By default every number (value, gradient, every reduction and the
``ignore_index`` / ``include_background`` conventions) equals MONAI 1.6.1's ``monai.losses.FocalLoss``; MONAI's odd
conventions are documented on :class:`FocalLoss` and each has an opt-out.

Softmax focal with an integer label map is fused: one ``log_softmax``, ``log p_t`` gathered at the label (no
one-hot), and a closed-form backward from the saved log-probabilities (:class:`_fused.SoftmaxFocalAtLabel`), so it
costs about one ``F.cross_entropy`` instead of MONAI's one-hot tensor plus several full-size intermediates.
Sigmoid focal with a label map (the focal term of ``DiceFocalLoss``) is fused as well
(:class:`_fused.SigmoidFocalAtLabel`): it saves only the logits and labels, recomputes in backward, and loops over
channels and column blocks, so its only full-size allocation is the input gradient. Dense targets take the
plain autograd path.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from segloss.losses import _fused
from segloss.losses._fused import fused_paths_enabled
from segloss.losses.inputs import (
    Target,
    Weight,
    _plain,
    check_reduction,
    finite_loss,
    first_class,
    per_class_weight,
    prepare_target,
    safe_ratio,
)

__all__ = ["FocalLoss", "focal_loss", "set_alpha"]


def _softmax_focal_at_label(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """The plain autograd form of :class:`_fused.SoftmaxFocalAtLabel`: ``-(1 - p_t)^gamma log p_t``, ``(B, N)``."""
    logp_t = torch.log_softmax(logits, 1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return -torch.expm1(logp_t).neg().pow(gamma) * logp_t


def _pad(vec: torch.Tensor | None, n: int, start: int, like: torch.Tensor) -> torch.Tensor:
    """Per-label factors over all ``C = start + n`` labels: ``vec`` (ones if None) after ``start`` zeros, so
    that indexing with a label map also drops the background voxels when ``start == 1``."""
    vec = like.new_ones(n) if vec is None else vec
    return torch.cat([vec.new_zeros(start), vec]) if start else vec


def _times(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a * b


def _sigmoid_focal_at_label(
    input: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    start: int,
    factors: torch.Tensor | None,
    per_element: bool,
) -> torch.Tensor:
    """The plain autograd form of :class:`_fused.SigmoidFocalAtLabel` (same arguments and result)."""
    x = input.reshape(*input.shape[:2], -1)[:, start:]
    positive = labels.unsqueeze(1) == torch.arange(start, input.shape[1], device=x.device).view(1, -1, 1)
    z = torch.where(positive, -x, x)
    loss = F.softplus(z) * torch.exp(gamma * F.logsigmoid(z))
    if factors is not None:
        loss = loss * torch.where(positive, factors[0].view(-1, 1), factors[1].view(-1, 1))
    return loss if per_element else loss.sum(1)


def _softmax_focal(
    x: torch.Tensor, tgt: Target, gamma: float, start: int, over_all: bool, factor: torch.Tensor | None, none: bool
) -> torch.Tensor:
    """Softmax focal loss ``(B, n, N)`` (``(B, 1, N)`` summed over channels for a label map unless ``none``),
    times the per-channel ``factor`` (alpha times class weight), for logits ``x`` ``(B, C, N)``."""
    n = x.shape[1] - start
    own_softmax = start and not over_all  # MONAI: softmax over the foreground channels only
    if tgt.labels is not None:
        t = tgt.labels
        idx = (t - start).clamp_min(0) if start else t  # channel among the n used; background voxels are zeroed below
        at_label = _fused.SoftmaxFocalAtLabel.apply if fused_paths_enabled() else _softmax_focal_at_label
        loss = at_label(x[:, start:] if own_softmax else x, idx if own_softmax else t, gamma)
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
    """Sigmoid (per-channel binary) focal loss ``(B, n, N)`` (``(B, 1, N)`` for a label map unless ``none``)
    for logits ``x`` ``(B, C, *)``.

    MONAI's alpha: a scalar weighs positives ``alpha`` and negatives ``1 - alpha``; a per-class alpha weighs the
    positives (target exactly 1) of class c by ``alpha_c`` and the negatives by 1.
    """
    n = x.shape[1] - start
    if tgt.dense is not None:
        xs, g = x.flatten(2)[:, start:], tgt.dense[:, start:]
        loss = xs - xs * g - F.logsigmoid(xs)  # BCE with logits
        if gamma != 0:
            loss = torch.exp(gamma * F.logsigmoid(xs * (1 - 2 * g))) * loss
        if isinstance(alpha, float):
            loss = loss * (g * alpha + (1 - g) * (1 - alpha))
        elif alpha is not None:
            loss = loss * torch.where(g == 1, alpha.view(n, 1), 1.0)
        return loss if cw is None else loss * cw.view(n, 1)
    # Label map: fused, never one-hot (see _fused.SigmoidFocalAtLabel)
    if isinstance(alpha, float):
        pos, neg = _times(x.new_full((n,), alpha), cw), _times(x.new_full((n,), 1 - alpha), cw)
    else:
        pos, neg = _times(alpha, cw), cw
    factors = None
    if pos is not None or neg is not None:
        ones = x.new_ones(n)
        factors = torch.stack([ones if pos is None else pos, ones if neg is None else neg])
    at_label = _fused.SigmoidFocalAtLabel.apply if fused_paths_enabled() else _sigmoid_focal_at_label
    loss = at_label(x, tgt.labels, gamma, start, factors, none)
    return loss if none else loss.unsqueeze(1)


@finite_loss
def focal_loss(
    input: torch.Tensor,
    target: torch.Tensor | Target,
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
    tgt = prepare_target(input, target, to_onehot_y=to_onehot_y, ignore_index=ignore_index, weight_map=weight_map)
    B, C = input.shape[:2]
    start = first_class(include_background, C)
    n = C - start
    if use_softmax and start and isinstance(alpha, float) and not softmax_over_all_channels:
        warnings.warn("`include_background=False`, scalar `alpha` ignored when using softmax.", stacklevel=3)
        alpha = None
    none = reduction == "none"
    with torch.autocast(input.device.type, enabled=False):
        xf = _plain(input).float()
        x = xf.reshape(B, C, -1)
        N = x.shape[-1]
        cw = per_class_weight(weight, "weight", n, x.device)
        if not isinstance(alpha, float):
            alpha = per_class_weight(alpha, "alpha", n, x.device)
        if use_softmax:
            if isinstance(alpha, float):  # MONAI: 1 - alpha for the background channel, alpha for the others
                full = x.new_full((C,), alpha)
                full[0] = 1 - alpha
                alpha = full[start:]
            loss = _softmax_focal(x, tgt, gamma, start, softmax_over_all_channels, _times(alpha, cw), none)
        else:
            loss = _sigmoid_focal(xf, tgt, gamma, start, alpha, cw, none)
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


def set_alpha(module: nn.Module, alpha: Weight) -> None:
    """Store a focal ``alpha`` on ``module``: a scalar (checked in [0, 1]) as a float, one value per channel used as
    a buffer (checked finite and >= 0), None as None."""
    alpha_t = per_class_weight(alpha, "alpha")
    if alpha_t is not None and alpha_t.ndim == 0:
        if float(alpha_t) > 1:
            raise ValueError(f"A scalar `alpha` must lie in [0, 1], got {float(alpha_t)}.")
        module.alpha = float(alpha_t)
    elif alpha_t is not None:
        module.register_buffer("alpha", alpha_t)
    else:
        module.alpha = None


class FocalLoss(nn.Module):
    r"""Focal loss (Lin et al., ICCV 2017), a drop-in for MONAI 1.6.1's ``monai.losses.FocalLoss``.

    For logits ``x`` ``(B, C, *spatial)`` and target ``g`` (one-hot / soft / multi-label, or a label map standing
    for one-hot channels), per element (voxel v, channel c):

    .. math::

        \text{sigmoid (default):} \quad \ell_{vc} = u_v \, w_c \, \alpha_{vc} \, (1 - p_t)^\gamma \,
        \mathrm{BCE}(x_{vc}, g_{vc}), \qquad p_t = \begin{cases} \sigma(x_{vc}) & g_{vc} = 1 \\
        1 - \sigma(x_{vc}) & g_{vc} = 0 \end{cases}

        \text{softmax:} \quad \ell_{vc} = -u_v \, w_c \, \alpha_c \, (1 - p_{vc})^\gamma \log(p_{vc}) \, g_{vc},
        \qquad p_v = \operatorname{softmax}(x_v)

    with the class ``weight`` ``w_c`` and the voxel weight ``u_v`` (0 at ``ignore_index``, times ``weight_map``;
    per element for a ``(B, C, *)`` weight map). For a soft target the sigmoid factor is computed as
    ``sigmoid(x (1 - 2g))^gamma``, which is ``(1 - p_t)^gamma`` for ``g`` in {0, 1}.
    ``gamma = 0`` gives plain (alpha-weighted) cross-entropy. Alpha (MONAI's conventions): sigmoid, scalar:
    ``alpha`` for positives, ``1 - alpha`` for negatives; sigmoid, per class: ``alpha_c`` for positives (target
    exactly 1), 1 for negatives; softmax, scalar: ``1 - alpha`` for channel 0 and ``alpha`` for the others;
    softmax, per class: ``alpha_c``. Per-class ``alpha`` and ``weight`` have one entry per channel used (``C - 1``
    with ``include_background=False``).

    Reductions (with ``n`` channels used, ``V`` = sum of voxel weights, ``B N`` without weights or ignore):

    .. math::

        \text{mean} = \frac{\sum_{b,c,v} \ell_{bcv}}{k \, V}, \qquad
        k = \begin{cases} 1 & \mathtt{ignore\_index} \text{ set and not } \mathtt{ce\_mean} \text{ (MONAI)},
        \text{ or } \mathtt{use\_softmax} \text{ with } \mathtt{ce\_mean} \\ n & \text{otherwise} \end{cases}

        \text{sum} = \sum_{b,c} \frac{\sum_v \ell_{bcv}}{V_b}

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

    Example:
        Values equal MONAI's; ``gamma = 0`` with ``ce_mean=True`` is ``F.cross_entropy``:

        >>> import monai
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from segloss.losses import FocalLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))  # 3D: (B,C,D,H,W), (B,1,D,H,W)
        >>> loss = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)
        >>> ref = monai.losses.FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0)
        >>> torch.allclose(loss(logits, label), ref(logits, label))
        True
        >>> ce = FocalLoss(use_softmax=True, gamma=0.0, ce_mean=True)
        >>> torch.allclose(ce(logits, label), F.cross_entropy(logits, label[:, 0]))
        True
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
        set_alpha(self, alpha)
        self.register_buffer("class_weight", per_class_weight(weight, "weight"))
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
