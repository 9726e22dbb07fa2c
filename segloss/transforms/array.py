"""Array transforms that make the extra targets segloss losses consume: voxel weight maps and skeletons.

All transforms take one channel-first label ``(1, H, W)`` or ``(1, D, H, W)`` (one sample, as MONAI's pre-collate
transforms) holding integer values (any integer, bool or float dtype whose values are whole numbers), and return
the same container: numpy in -> numpy out, ``torch.Tensor`` in -> tensor on the same device, ``MetaTensor`` in ->
``MetaTensor`` carrying the input's meta data and affine. The maths runs on the CPU with numpy / scipy.ndimage /
scikit-image in pure functions (:func:`class_weight_map`, :func:`border_weight_map`, :func:`label_skeleton`) on
the spatial array; the ``Transform`` classes hold the options and do validation and type conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.transforms import Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage
from skimage.morphology import skeletonize

__all__ = [
    "BorderWeightMap",
    "ClassWeightMap",
    "Skeletonize",
    "balanced_class_weights",
    "border_weight_map",
    "class_weight_map",
    "binary_skeleton",
    "label_skeleton",
]

# Border term below w0 * _BORDER_EPS is dropped: distances are only computed within
# sigma * sqrt(2 ln(1 / _BORDER_EPS)) (~5.26 sigma) of each object.
_BORDER_EPS = 1e-6


# ------------------------------------------------------------------------------------------------- input handling


def _spatial_label(img: NdarrayOrTensor, name: str = "img") -> np.ndarray:
    """The ``(*spatial)`` int64 numpy label of a channel-first ``(1, *spatial)`` 2D/3D label, validated."""
    arr = convert_data_type(img, np.ndarray)[0]
    if arr.ndim not in (3, 4) or arr.shape[0] != 1:
        raise ValueError(
            f"`{name}` must be a channel-first label (1, H, W) or (1, D, H, W), got shape {tuple(arr.shape)}."
        )
    arr = arr[0]
    if arr.dtype.kind == "f":
        # MONAI loaders give float labels; accept them only when every value is a whole number
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"`{name}` must hold integer label values, got non-integer or non-finite floats.")
    elif arr.dtype.kind not in "biu":
        raise ValueError(f"`{name}` must be an integer, bool or integer-valued float label, got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


def _check_non_negative(label: np.ndarray, name: str = "img") -> None:
    if label.size and label.min() < 0:
        raise ValueError(f"`{name}` must hold non-negative labels, got {label.min()}.")


def _like(out: np.ndarray, img: NdarrayOrTensor, dtype=None) -> NdarrayOrTensor:
    """``out`` as ``img``'s container/device (MetaTensor meta copied when meta tracking is on), MONAI style."""
    res = convert_to_dst_type(out, img, dtype=dtype)[0]
    if isinstance(res, MetaTensor) and not get_track_meta():
        res = res.as_tensor()
    return res


def _spacing(spacing: float | Sequence[float] | None, ndim: int | None) -> tuple[float, ...]:
    """Per-axis voxel size for ``ndim`` spatial axes (``ndim=None``: only check the values)."""
    if spacing is None:
        return (1.0,) * (ndim or 1)
    sp = (float(spacing),) * (ndim or 1) if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if (ndim is not None and len(sp) != ndim) or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"`spacing` must be a positive number or {ndim} positive numbers, got {spacing}.")
    return sp


# ------------------------------------------------------------------------------------------------- class weights


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights with mean voxel weight 1: ``w_c = N / (K n_c)``.

    ``counts`` ``(C,)`` voxel counts; ``N = sum_c n_c``, ``K`` = number of classes with ``n_c > 0``. Then
    ``sum_c n_c w_c / N = 1``, i.e. the weight averaged over the voxels is exactly 1 (scikit-learn's
    ``compute_class_weight("balanced")``). Absent classes get weight 0. float64 ``(C,)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def class_weight_map(
    label: np.ndarray,
    num_classes: int | None = None,
    clip: float | tuple[float, float] | None = None,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Per-voxel inverse class frequency of a spatial integer label map (float32, same shape).

    With ``n_c`` the number of non-ignored voxels of class ``c``, ``N = sum_c n_c`` and ``K`` the number of
    classes present, every voxel of class ``c`` gets (:func:`balanced_class_weights`)::

        w_c = N / (K n_c)        so that the mean weight over the non-ignored voxels is exactly 1,

    then, in this order:

    - ``clip=r`` (a number >= 1): cap the ratio of largest to smallest weight at ``r``,
      ``w_c <- min(w_c, r * min_k w_k)``, then rescale all ``w_c`` so the mean voxel weight is 1 again;
    - ``clip=(lo, hi)``: ``w_c <- clip(w_c, lo, hi)`` (absolute bounds, no rescaling: the mean may move off 1).

    Voxels equal to ``ignore_index`` get weight 0 and are not counted. An empty map (all voxels ignored) gives
    all zeros; a single present class gives all ones (before an absolute clip).
    """
    valid = label != ignore_index if ignore_index is not None else np.ones(label.shape, dtype=bool)
    values = label[valid]
    _check_non_negative(values)
    if num_classes is not None and values.size and values.max() >= num_classes:
        raise ValueError(f"`img` holds label {values.max()}, outside `num_classes`={num_classes}.")
    counts = np.bincount(values, minlength=num_classes or 0)
    weights = balanced_class_weights(counts)
    if clip is not None and values.size:
        if np.isscalar(clip):
            present = counts > 0
            weights[present] = np.minimum(weights[present], float(clip) * weights[present].min())
            weights *= counts.sum() / np.dot(weights, counts)
        else:
            weights = np.clip(weights, clip[0], clip[1])
    out = np.zeros(label.shape, dtype=np.float32)
    out[valid] = weights[values]
    return out


def _check_clip(clip) -> float | tuple[float, float] | None:
    if clip is None:
        return None
    if np.isscalar(clip):
        if not float(clip) >= 1.0:  # also rejects NaN
            raise ValueError(f"`clip` as a max weight ratio must be >= 1, got {clip}.")
        return float(clip)
    lo, hi = (float(c) for c in clip)
    if not (0.0 <= lo <= hi):
        raise ValueError(f"`clip` as (min, max) needs 0 <= min <= max, got {clip}.")
    return lo, hi


class ClassWeightMap(Transform):
    """Voxel weight map of inverse class frequencies, normalised to mean 1 (see :func:`class_weight_map`).

    Args:
        num_classes: number of classes; when given, labels must lie in ``[0, num_classes)``.
        clip: ``None``; a number ``r >= 1`` capping the largest/smallest weight ratio (then renormalised to
            mean 1); or ``(min, max)`` absolute bounds applied last.
        ignore_index: label whose voxels get weight 0 and are excluded from the frequencies.

    Input ``(1, *spatial)`` integer-valued label (2D or 3D); output ``(1, *spatial)`` float32 weights in the
    input's container (numpy / tensor / MetaTensor with its meta). Pass it to a loss as ``weight_map``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        num_classes: int | None = None,
        clip: float | tuple[float, float] | None = None,
        ignore_index: int | None = None,
    ) -> None:
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.clip = _check_clip(clip)
        self.ignore_index = ignore_index

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        label = _spatial_label(img)
        out = class_weight_map(label, self.num_classes, self.clip, self.ignore_index)
        return _like(out[None], img, dtype=np.float32)


# ------------------------------------------------------------------------------------------------- border weights


def _two_nearest_distances(
    objects: np.ndarray, num_objects: int, cutoff: float, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``d1 <= d2`` of every voxel to its nearest and second-nearest object (float64).

    ``objects`` holds ids ``1..num_objects`` (0 = none). Each object's exact EDT is computed only inside its
    bounding box grown by ``cutoff`` (in spacing units), and the two smallest values are kept per voxel. So
    ``d1``/``d2`` are exact wherever they are ``< cutoff``; elsewhere they are ``>= cutoff`` (possibly inf).
    Cost: sum of the grown box sizes, not ``num_objects`` full-volume EDTs.
    """
    d1 = np.full(objects.shape, np.inf)
    d2 = np.full(objects.shape, np.inf)
    margin = [math.ceil(cutoff / s) for s in spacing]
    for obj_id, box in enumerate(ndimage.find_objects(objects, max_label=num_objects), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margin, objects.shape))
        dist = ndimage.distance_transform_edt(objects[box] != obj_id, sampling=spacing)
        near, second = d1[box], d2[box]  # views: updated in place
        np.minimum(second, np.maximum(near, dist), out=second)  # second smallest of {near, second, dist}
        np.minimum(near, dist, out=near)
    return d1, d2


def border_weight_map(
    label: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    object_labels: Sequence[int] | None = None,
    class_weight: str | Sequence[float] | None = "balanced",
    spacing: float | Sequence[float] | None = None,
) -> np.ndarray:
    """U-Net weight map (Ronneberger et al., MICCAI 2015, eq. 2) of a spatial integer label map, float32.

    ::

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))     on background voxels x,
        w(x) = w_c(x)                                                  on object voxels,

    with ``d1``, ``d2`` the (spacing-scaled) Euclidean distances to the nearest and second-nearest object. The
    border term is meant for the gaps between objects (the paper's "separation borders between touching cells");
    eq. 2 is written for all pixels, but the weight map of the paper's Fig. 3d, like common implementations, has it
    on background pixels only, and so does this function. It is 0 where there are fewer than two objects.

    Objects and background:

    - ``object_labels=None`` (instance mode): ``label`` is an instance map; every non-zero value is one object
      (even if split into pieces), 0 is background. ``w_c`` balances foreground (``label > 0``) vs background.
    - ``object_labels=[...]`` (binary mode): the objects are the connected components (face connectivity: 4 in
      2D, 6 in 3D, so cells split by a diagonal 1-voxel membrane stay apart) of ``isin(label, object_labels)``;
      all other voxels are background. ``w_c`` balances the label values themselves. E.g. ISBI EM membranes with
      label 1 = membrane, 0 = cell: ``object_labels=[0]`` (cells are objects, membranes get the border term).

    ``class_weight``: ``"balanced"`` -> ``w_c = N / (K n_c)`` over the ``K`` classes present
    (:func:`balanced_class_weights`, mean 1); ``None`` -> ``w_c = 1``; a sequence -> explicit weights indexed by
    label value (binary mode) or ``(background, foreground)`` (instance mode).

    Exactness: distances are computed per object in its bounding box grown by
    ``sigma * sqrt(2 ln 1e6)`` (~5.26 sigma); the border term is exact wherever it exceeds ``1e-6 * w0`` and 0
    elsewhere (absolute error < ``1e-6 * w0``). An empty map (no objects) gives ``w_c`` everywhere.
    """
    _check_non_negative(label)
    spacing = _spacing(spacing, label.ndim)
    if object_labels is None:
        _, objects = np.unique(label, return_inverse=True)  # consecutive ids, 0 stays 0 (labels are >= 0)
        objects = objects.reshape(label.shape)
        if label.size and label.min() > 0:  # no background at all: shift so every value is an object
            objects += 1
        num_objects = int(objects.max(initial=0))
        classes = (label > 0).astype(np.int64)
    else:
        objects, num_objects = ndimage.label(np.isin(label, np.asarray(object_labels)))
        classes = label

    counts = np.bincount(classes.ravel())
    if class_weight is None:
        weights = np.ones(len(counts))
    elif isinstance(class_weight, str):
        weights = balanced_class_weights(counts)
    else:
        weights = np.asarray(class_weight, dtype=np.float64)
        if weights.ndim != 1 or len(weights) < len(counts):
            raise ValueError(
                f"`class_weight` needs one weight per class ({len(counts)} here: "
                f"{'(background, foreground)' if object_labels is None else 'indexed by label value'}), got {class_weight}."
            )
    out = weights[classes]

    if w0 > 0 and num_objects >= 2:
        cutoff = sigma * math.sqrt(2.0 * math.log(1.0 / _BORDER_EPS))
        d1, d2 = _two_nearest_distances(objects, num_objects, cutoff, spacing)
        background = objects == 0
        s = d1[background] + d2[background]  # inf where a second object is farther than cutoff -> exp gives 0
        out[background] += w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))
    return out.astype(np.float32)


class BorderWeightMap(Transform):
    """U-Net border weight map of Ronneberger et al. 2015 (see :func:`border_weight_map` for the exact maths).

    Args:
        w0: border weight (paper: 10). >= 0.
        sigma: border width in spacing units (paper: ~5 pixels). > 0.
        object_labels: ``None`` -> the label is an instance map (each non-zero value one object); a list of label
            values -> the objects are the connected components of the voxels holding one of them
            (e.g. ``[0]`` for ISBI EM where 1 = membrane, 0 = cell).
        class_weight: ``"balanced"`` (inverse frequency, mean 1), ``None`` (1) or per-class weights.
        spacing: voxel size per spatial axis (or one number) for anisotropic distances; default 1.

    Input ``(1, *spatial)`` integer-valued label (2D or 3D); output ``(1, *spatial)`` float32 in the input's
    container (numpy / tensor / MetaTensor with its meta). Measured: ~0.09 s for a 512x512 section with 136-187
    cells on one CPU core (one full EDT per cell: ~4.3 s).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        object_labels: Sequence[int] | None = None,
        class_weight: str | Sequence[float] | None = "balanced",
        spacing: float | Sequence[float] | None = None,
    ) -> None:
        if not (math.isfinite(float(w0)) and w0 >= 0):
            raise ValueError(f"`w0` must be finite and >= 0, got {w0}.")
        if not (math.isfinite(float(sigma)) and sigma > 0):
            raise ValueError(f"`sigma` must be finite and > 0, got {sigma}.")
        if isinstance(class_weight, str) and class_weight != "balanced":
            raise ValueError(f"`class_weight` must be 'balanced', None or a sequence, got {class_weight!r}.")
        if class_weight is not None and not isinstance(class_weight, str):
            cw = np.asarray(class_weight, dtype=np.float64)
            if cw.ndim != 1 or not np.all(np.isfinite(cw)) or np.any(cw < 0):
                raise ValueError(f"`class_weight` must be finite non-negative numbers, got {class_weight}.")
        if object_labels is not None and len(object_labels) == 0:
            raise ValueError("`object_labels` must be None (instance map) or a non-empty list of label values.")
        _spacing(spacing, None)
        self.w0 = float(w0)
        self.sigma = float(sigma)
        self.object_labels = None if object_labels is None else [int(v) for v in object_labels]
        self.class_weight = class_weight
        self.spacing = spacing

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        label = _spatial_label(img)
        out = border_weight_map(label, self.w0, self.sigma, self.object_labels, self.class_weight, self.spacing)
        return _like(out[None], img, dtype=np.float32)


# ------------------------------------------------------------------------------------------------- skeletons


def _grow(box: tuple[slice, ...], by: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(b.start - by, 0), min(b.stop + by, n)) for b, n in zip(box, shape))


def _thin(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Skeleton of a (cropped) binary mask, grown geodesically inside the mask by ``dilation`` steps."""
    skel = skeletonize(mask) > 0
    if dilation:
        cross = ndimage.generate_binary_structure(mask.ndim, 1)
        skel = ndimage.binary_dilation(skel, structure=cross, iterations=dilation, mask=mask)
    return skel


def binary_skeleton(mask: np.ndarray, dilation: int = 0) -> np.ndarray:
    """Skeleton (or tube, see :func:`label_skeleton`) of one spatial bool mask, bool of the same shape."""
    out = np.zeros(mask.shape, dtype=bool)
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if boxes:
        box = _grow(boxes[0], 1, mask.shape)
        out[box] = _thin(mask[box], dilation)
    return out


def label_skeleton(label: np.ndarray, dilation: int = 0) -> np.ndarray:
    """Per-class skeletons of a spatial non-negative integer label map, as a label map of the same shape/dtype.

    Each non-zero class mask ``label == c`` is skeletonised on its own (cropped to its bounding box plus a
    1-voxel frame) and its skeleton voxels are set to ``c`` (0 elsewhere): 2D with
    ``skimage.morphology.skeletonize`` (Zhang-Suen thinning), 3D with Lee et al.'s 3D thinning (skimage's 3D
    method). Both keep topology: one skeleton component per 8-/26-connected mask component, holes kept.

    ``dilation=r > 0`` grows each skeleton into a tube by ``r`` city-block steps (``r`` binary dilations with the
    face-connected cross, as nnU-Net's Skeleton Recall tube with ``r=2``), geodesically inside the class's own
    mask (``scipy.ndimage.binary_dilation(..., mask=label == c)``). So a tube never leaves its class, never
    overwrites another class's voxels or skeleton, and each tube component holds exactly one skeleton component
    (tubes cannot merge through background or other classes). Unlike nnU-Net, the tube is cut at the class
    border instead of at the foreground border.
    """
    out = np.zeros_like(label)
    for c, box in enumerate(ndimage.find_objects(label), start=1):
        if box is not None:
            box = _grow(box, 1, label.shape)
            out[box][_thin(label[box] == c, dilation)] = c  # masks are disjoint, so are the tubes
    return out


class Skeletonize(Transform):
    """Per-class skeleton (optionally a thin tube) of a label map: the target of ``SkeletonRecallLoss``.

    Kirchhoff et al., "Skeleton Recall Loss for Connectivity Conserving and Resource Efficient Segmentation of
    Thin Tubular Structures", ECCV 2024. See :func:`label_skeleton` for the skeletonisation and the tube.

    Args:
        include_background: ``False`` -> skeletonise the non-zero classes and return a label map ``(1, *spatial)``
            holding class ``c`` on class ``c``'s skeleton/tube voxels and 0 elsewhere (input dtype). ``True`` ->
            also skeletonise class 0; since value 0 cannot mark a background skeleton in a label map, a dense
            one-hot ``(C, *spatial)`` skeleton is returned instead (channel ``c`` = class ``c``'s skeleton, input
            dtype; ``SkeletonRecallLoss`` takes both forms).
        dilation: tube radius in city-block voxel steps, >= 0 (0 = the bare 1-voxel skeleton; 2 = nnU-Net's tube).
        num_classes: classes ``0..num_classes-1`` (labels must lie below it; fixes ``C`` of the one-hot form);
            default: the values present (``C`` = max label + 1).

    An empty label (all 0) gives all zeros. Labels must be non-negative integers (an ``ignore_index`` such as
    255 would be skeletonised as a class: mask it out first).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, include_background: bool = False, dilation: int = 0, num_classes: int | None = None) -> None:
        if int(dilation) != dilation or dilation < 0:
            raise ValueError(f"`dilation` must be an integer >= 0, got {dilation}.")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
        self.include_background = include_background
        self.dilation = int(dilation)
        self.num_classes = None if num_classes is None else int(num_classes)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        label = _spatial_label(img)
        _check_non_negative(label)
        top = int(label.max(initial=0))
        if self.num_classes is not None and top >= self.num_classes:
            raise ValueError(f"`img` holds label {top}, outside `num_classes`={self.num_classes}.")
        skel = label_skeleton(label, self.dilation)
        if not self.include_background:
            return _like(skel[None], img)
        num_classes = self.num_classes or top + 1
        onehot = skel[None] == np.arange(num_classes).reshape(-1, *([1] * label.ndim))
        onehot[0] = binary_skeleton(label == 0, self.dilation)
        return _like(onehot, img)
