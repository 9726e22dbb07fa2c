"""The one input path shared by every segloss loss.

Each loss goes through the same three steps, so activation, target handling, ignore masks,
validation and reduction behave identically everywhere:

1. :func:`prepare_target` reads the target as either an **integer label map** ``(B,1,*)`` / ``(B,*)``
   or a **dense** (one-hot, multi-label or soft) tensor ``(B,C,*)`` and folds ``ignore_index`` and an
   optional per-voxel ``weight_map`` into one float32 voxel weight (0 = ignored). A label map is never
   expanded to a one-hot tensor: per-class statistics are gathered/scattered from it instead
   (:func:`class_sums`), which keeps many-class 3D memory-lean.
2. :func:`activate` applies ``sigmoid`` / ``softmax`` / ``other_act`` (MONAI's names) in float32.
3. :func:`~segloss.losses.class_sums.class_sums` returns per-class (tp, sum of prediction, sum of target) in float32 with autocast
   disabled (fp16 sums overflow at 512x512), optionally summed over the batch and all-reduced across
   ``torch.distributed`` ranks with autograd (``sync_batch``); :func:`reduce_loss` applies MONAI's
   ``reduction`` conventions.

Spatial dimensions are flattened to one axis ``N`` (a view for contiguous tensors), so the same code
serves 2D and 3D.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Target",
    "Weight",
    "activate",
    "check_input_shape",
    "check_sync_batch",
    "finite_loss",
    "per_class_weight",
    "first_class",
    "input_checks_enabled",
    "prepare_target",
    "reduce_loss",
    "safe_ratio",
    "set_input_checks",
    "validate_act_args",
]

_CHECKS_ENABLED = True


def set_input_checks(enabled: bool) -> None:
    """Turn the data-dependent input checks (NaN/Inf, label range, integral labels) on or off.

    The checks read values back to the host, one synchronisation per loss call. They are on by default;
    switch them off for the last few percent of GPU speed once a pipeline is known to be clean. They are
    skipped automatically inside ``torch.compile``.
    """
    global _CHECKS_ENABLED
    _CHECKS_ENABLED = bool(enabled)


def input_checks_enabled() -> bool:
    return _CHECKS_ENABLED and not torch.compiler.is_compiling()


def _plain(x: torch.Tensor) -> torch.Tensor:
    # MetaTensor's __torch_function__ costs time on every op; the losses need only the data.
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def validate_act_args(sigmoid: bool, softmax: bool, other_act: Callable | None) -> None:
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
    if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
        raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")


def finite_loss(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Decorator of a functional loss: its value must be finite, else ``ValueError`` names ``input``.

    The targets and weight maps are checked where they are read (:func:`prepare_target`); the input is checked
    through the loss it gives, one reduction of the (small) result instead of another pass over the input. A NaN
    logit makes the loss NaN; so does +Inf under a softmax, and -Inf at the label under a log (cross-entropy,
    focal). A -Inf logit that only makes a probability 0 (a masked class) or an infinity that saturates a sigmoid
    gives a finite loss and a finite gradient, and is accepted.
    """

    @functools.wraps(loss_fn)
    def checked(*args, **kwargs) -> torch.Tensor:
        value = loss_fn(*args, **kwargs)
        if input_checks_enabled() and not bool(torch.isfinite(value.detach().sum())):
            raise ValueError(
                "`input` contains NaN or Inf values that make the loss non-finite (a -Inf logit is accepted where "
                "it only makes a probability 0)."
            )
        return value

    return checked


def activate(
    input: torch.Tensor, sigmoid: bool = False, softmax: bool = False, other_act: Callable | None = None
) -> torch.Tensor:
    """Apply the activation to ``input`` ``(B,C,*)`` in float32 (MONAI semantics: softmax on one channel
    is skipped with a warning)."""
    input = _plain(input).float()
    if sigmoid:
        input = torch.sigmoid(input)
    if softmax:
        if input.shape[1] == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        else:
            input = torch.softmax(input, 1)
    if other_act is not None:
        input = other_act(input)
    return input


@dataclass
class Target:
    """A target in the form the losses consume, spatial dimensions flattened to ``N``.

    Exactly one of ``labels`` / ``dense`` is set.

    Attributes:
        labels: ``(B, N)`` int64 class indices in ``[0, C)``; ignored voxels hold 0 (and weight 0).
        dense: ``(B, C, N)`` float32 one-hot / multi-label / soft target.
        weight: float32 voxel weight, ``(B, 1, N)`` (or ``(B, C, N)`` for element-wise ignore on dense
            targets): 0 where ignored, the weight-map value elsewhere. ``None`` means all ones.
        num_classes: ``C``, the number of prediction channels.
        spatial_shape: the original spatial shape, for ``reduction="none"`` outputs.
    """

    labels: torch.Tensor | None
    dense: torch.Tensor | None
    weight: torch.Tensor | None
    num_classes: int
    spatial_shape: torch.Size

    @property
    def is_labels(self) -> bool:
        return self.labels is not None


def check_input_shape(input: torch.Tensor) -> None:
    """``input`` must be ``(B, C, *spatial)`` with no empty dimension; ``(B, C)`` (classification-shaped, as MONAI
    accepts) counts as one voxel per item."""
    if input.ndim < 2:
        raise ValueError(f"`input` must have shape (B, C, *spatial) or (B, C), got {tuple(input.shape)}.")
    if input.numel() == 0:
        raise ValueError(
            f"`input` of shape {tuple(input.shape)} is empty (B = 0, C = 0 or a spatial size 0): there is no loss "
            "to compute."
        )


def _label_map(target: torch.Tensor, input_ndim: int) -> torch.Tensor:
    """(B,1,*) or (B,*) -> (B,*)"""
    if target.ndim == input_ndim:
        if target.shape[1] != 1:
            raise ValueError(
                f"`target` must be a label map of shape (B,1,*) or (B,*) here, got shape {tuple(target.shape)}."
            )
        return target[:, 0]
    return target


def prepare_target(
    input: torch.Tensor,
    target: torch.Tensor | Target,
    *,
    to_onehot_y: bool = False,
    ignore_index: int | None = None,
    weight_map: torch.Tensor | None = None,
) -> Target:
    """Read ``target`` against ``input`` ``(B,C,*)``.

    The target is a **label map** when ``to_onehot_y=True``, when it has no channel axis ``(B,*)``, or when it has one
    channel while ``input`` has several; otherwise it must have ``input``'s shape and is **dense**. For a
    one-channel ``input`` a ``(B,*)`` target is the binary mask ``(B,1,*)`` (dense). Label maps may be integer or float
    tensors holding whole numbers (MONAI loaders give float labels); values must lie in ``[0, C)`` apart from
    ``ignore_index``.

    ``ignore_index`` on a label map masks the voxels with that label. On a dense target it follows
    MONAI: a class index in ``[0, C)`` masks the voxels where that channel is set; any other value masks
    the elements equal to it (e.g. 255 in a binary mask), element-wise, so it also works per channel for
    multi-label targets.

    ``weight_map`` ``(B,1,*)``, ``(B,*)`` or ``(B,C,*)`` (dense targets only for the latter) multiplies the
    voxel weight; it must be finite and non-negative.

    ``input`` is checked for its shape only; NaN/Inf in it are found in the loss value (:func:`finite_loss`), so no
    loss makes one more pass over the input.

    A :class:`Target` (prepared by an earlier call for the same input, e.g. by a compound loss for each of its
    terms) is returned as it is after a shape check: it already holds the ignore mask and the weight map, so
    ``to_onehot_y`` and ``ignore_index`` do not apply and ``weight_map`` must be None.

    Raises:
        ValueError: naming ``target``, ``input`` or ``weight_map`` for shape mismatches, non-integer or
            out-of-range labels, NaN/Inf, or negative weights.
    """
    input = _plain(input)
    check_input_shape(input)
    B, C = input.shape[:2]
    spatial = input.shape[2:]
    if isinstance(target, Target):
        return _checked_prepared(target, input.shape, weight_map)
    target = _plain(target)
    if C == 1 and target.ndim == input.ndim - 1:
        target = target.unsqueeze(1)  # one channel: a (B,*) target is its binary mask, not class indices
    if to_onehot_y and C == 1:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
    is_labels = (
        (to_onehot_y and C > 1)
        or target.ndim == input.ndim - 1
        or (target.ndim == input.ndim and target.shape[1] == 1 and C > 1)
    )
    if is_labels:
        labels, dense, weight = _read_label_map(target, input.shape, ignore_index), None, None
        if ignore_index is not None:
            valid = labels != ignore_index
            labels = labels.masked_fill(~valid, 0)
            weight = valid.unsqueeze(1).float()
    else:
        labels, (dense, weight) = None, _read_dense(target, input.shape, ignore_index)
    if weight_map is not None:
        wm = _read_weight_map(weight_map, input.shape, is_labels)
        weight = wm if weight is None else weight * wm
    return Target(labels, dense, weight, num_classes=C, spatial_shape=spatial)


def _checked_prepared(target: Target, input_shape: torch.Size, weight_map: torch.Tensor | None) -> Target:
    """A :class:`Target` prepared earlier, checked to be made for an input of ``input_shape``."""
    if weight_map is not None:
        raise ValueError("`weight_map` must be None with a prepared Target: its weight is already in the Target.")
    items = (target.labels if target.is_labels else target.dense).shape[0]
    if target.num_classes != input_shape[1] or target.spatial_shape != input_shape[2:] or items != input_shape[0]:
        raise ValueError(
            f"The prepared `target` ({items} items, {target.num_classes} classes, spatial "
            f"{tuple(target.spatial_shape)}) was made for another input than {tuple(input_shape)}."
        )
    return target


def _read_label_map(target: torch.Tensor, input_shape: torch.Size, ignore_index: int | None) -> torch.Tensor:
    """A label map ``(B,1,*)`` / ``(B,*)`` as ``(B, N)`` int64, checked whole and in ``[0, C)`` apart from
    ``ignore_index`` (the caller masks those)."""
    B, C, spatial = input_shape[0], input_shape[1], input_shape[2:]
    labels = _label_map(target, len(input_shape))
    if labels.shape[0] != B or labels.shape[1:] != spatial:
        raise ValueError(
            f"`target` label map of shape {tuple(target.shape)} does not match `input` of shape "
            f"{tuple(input_shape)}: expected (B,1,*spatial) or (B,*spatial) with B={B}, spatial={tuple(spatial)}."
        )
    if labels.is_complex():
        raise ValueError("`target` must be real-valued.")
    checks = input_checks_enabled()
    if labels.is_floating_point() and checks:
        if bool((~torch.isfinite(labels) | (labels != torch.trunc(labels))).any()):
            raise ValueError(
                "`target` is a label map but holds non-integer or non-finite values; "
                "pass class indices (integers), or a one-hot/soft target with the input's shape."
            )
    labels = labels.long().reshape(B, -1)
    if checks:
        in_range = labels if ignore_index is None else labels.masked_fill(labels == ignore_index, 0)
        lo, hi = torch.stack(torch.aminmax(in_range)).tolist()  # one host sync for both
        if lo < 0 or hi >= C:
            raise ValueError(
                f"`target` label values must lie in [0, {C}) for an input with {C} channels"
                + (f" (or equal ignore_index={ignore_index})" if ignore_index is not None else "")
                + f"; found values in [{lo}, {hi}]."
            )
    return labels


def _read_dense(
    target: torch.Tensor, input_shape: torch.Size, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense target with the input's shape as ``(B, C, N)`` float32, and the weight of its ``ignore_index``: a
    class index in ``[0, C)`` masks the voxels of that class, another value the elements equal to it."""
    B, C = input_shape[:2]
    if target.shape != input_shape:
        raise ValueError(
            f"`target` of shape {tuple(target.shape)} must be a label map (B,1,*)/(B,*) or have `input`'s "
            f"shape {tuple(input_shape)} (one-hot / soft target)."
        )
    dense = target.float().reshape(B, C, -1)
    weight = None
    if ignore_index is not None:
        if 0 <= ignore_index < C and C > 1:
            weight = 1.0 - dense[:, ignore_index : ignore_index + 1]
        else:
            keep = dense != ignore_index
            weight = keep.float()
            dense = dense.masked_fill(~keep, 0.0)
    if input_checks_enabled() and not bool(torch.isfinite(dense).all()):
        raise ValueError("`target` contains NaN or Inf values.")
    return dense, weight


def _read_weight_map(weight_map: torch.Tensor, input_shape: torch.Size, is_labels: bool) -> torch.Tensor:
    """``weight_map`` ``(B,1,*)`` / ``(B,*)`` / ``(B,C,*)`` (dense targets only) as ``(B, 1 or C, N)`` float32,
    checked finite and non-negative."""
    B, C, spatial, ndim = input_shape[0], input_shape[1], input_shape[2:], len(input_shape)
    wm = _plain(weight_map)
    if wm.ndim == ndim - 1:
        wm = wm.unsqueeze(1)
    if wm.ndim != ndim or wm.shape[0] != B or wm.shape[2:] != spatial or wm.shape[1] not in (1, C):
        raise ValueError(
            f"`weight_map` of shape {tuple(weight_map.shape)} must be (B,1,*spatial), (B,*spatial) or "
            f"(B,C,*spatial) for `input` of shape {tuple(input_shape)}."
        )
    if wm.shape[1] == C and C > 1 and is_labels:
        raise ValueError("`weight_map` with one channel per class needs a dense (one-hot) target.")
    wm = wm.float().reshape(B, wm.shape[1], -1)
    # one pass and one host sync: NaN fails both comparisons, +-Inf one of them
    if input_checks_enabled() and not bool(((wm >= 0) & (wm < float("inf"))).all()):
        raise ValueError("`weight_map` must be finite and non-negative.")
    return wm


def reduce_loss(f: torch.Tensor, reduction: str, spatial_ndim: int | None = None) -> torch.Tensor:
    """MONAI's reduction of a per-(batch, class) loss ``f`` (``(B,C)`` or ``(C,)``).

    ``"none"`` keeps MONAI's broadcastable shape ``(B, C, 1, ...)`` when ``spatial_ndim`` is given.
    """
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    if reduction == "none":
        if spatial_ndim is not None:
            return f.reshape(*f.shape, *([1] * spatial_ndim))
        return f
    raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')


def check_reduction(reduction: str) -> str:
    reduction = getattr(reduction, "value", reduction)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'Unsupported reduction: {reduction}, available options are ["mean", "sum", "none"].')
    return reduction


def first_class(include_background: bool, num_channels: int) -> int:
    """Index of the first channel a loss uses: 1 without background, but 0 (MONAI's warning) for one channel."""
    if include_background:
        return 0
    if num_channels == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=4)
        return 0
    return 1


def check_sync_batch(batch: bool, sync_batch: bool) -> None:
    if sync_batch and not batch:
        raise ValueError("`sync_batch=True` all-reduces batch statistics and needs `batch=True`.")


Weight = float | Sequence[float] | torch.Tensor | None


def per_class_weight(
    value: Weight, name: str, n: int | None = None, device: torch.device | None = None
) -> torch.Tensor | None:
    """A scalar or per-class option (``weight``, ``alpha``, ``pos_weight``...) as float32, or None.

    Without ``n`` (a module's constructor): checked on the host (finite, >= 0, at most 1D) and returned 0-dim or
    1D, to be kept as a buffer. With ``n`` (a functional call): a vector of length ``n`` on ``device`` (a scalar is
    broadcast); numbers and sequences are checked, a tensor is taken as already checked, so that a module's buffer
    on the GPU costs no device sync.
    """
    if value is None:
        return None
    if n is None or not isinstance(value, torch.Tensor):
        t = torch.as_tensor(value, dtype=torch.float32)
        if t.ndim > 1:
            raise ValueError(f"`{name}` must be a number or a 1D sequence, got shape {tuple(t.shape)}.")
        if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` values must be finite and no less than 0.")
        if n is None:
            return t
        value = t
    value = value.to(device=device, dtype=torch.float32)
    if value.ndim == 0:
        return value.expand(n)
    if value.ndim != 1 or value.shape[0] != n:
        raise ValueError(
            f"The length of `{name}` ({value.numel()}) must equal the number of classes used ({n}); "
            "with include_background=False it must not include the background class 0."
        )
    return value


def safe_ratio(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    """``num / den`` with ``den`` floored at the smallest normal float32: a zero total weight (everything
    ignored) gives 0 with a zero gradient instead of NaN, while any real weight sum is left unchanged."""
    if isinstance(den, torch.Tensor):
        den = den.clamp_min(torch.finfo(torch.float32).tiny)
    return num / den
