"""Topology and delineation metrics for thin structures, as MONAI cumulative metrics.

Pixel overlap (Dice) barely moves when a vessel or membrane is cut in two; these metrics do:

- :class:`BettiNumberError`: ``|beta_k(pred) - beta_k(target)|`` (components, loops/holes, cavities);
- :class:`ClDiceMetric`: hard centreline Dice (Shit et al., "clDice - a Novel Topology-Preserving Loss Function for
  Tubular Structure Segmentation", CVPR 2021);
- :class:`DelineationMetric`: completeness / correctness / quality within a distance tolerance (Wiedemann et al.,
  "Empirical Evaluation of Automatically Extracted Road Axes", 1998).

All three follow MONAI's metric conventions (:class:`monai.metrics.DiceMetric`): binarised one-hot ``(B, C, H, W)``
or ``(B, C, H, W, D)`` prediction ``y_pred`` and target ``y`` (e.g. after ``AsDiscrete(argmax=True, to_onehot=C)``),
one row per sample and class (``(B, C)``, or ``(B, C, K)`` with a last dimension of K values), ``include_background``,
``reduction`` over the non-NaN entries and ``get_not_nans``. They are validation metrics: each ``(b, c)`` mask is
processed on the CPU with numpy/scipy/scikit-image and the rows come back as float32 on ``y_pred``'s device. The
pure per-mask functions (:func:`betti_numbers`, :func:`betti_number_error`, :func:`cldice`,
:func:`delineation_scores`) take numpy boolean arrays.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction, ignore_background
from monai.utils import MetricReduction
from scipy.ndimage import distance_transform_edt
from skimage.measure import euler_number, label
from skimage.morphology import skeletonize

__all__ = [
    "BettiNumberError",
    "ClDiceMetric",
    "DelineationMetric",
    "betti_number_error",
    "betti_numbers",
    "cldice",
    "delineation_scores",
]


def _full_connectivity(ndim: int, connectivity: int | None) -> int:
    """Foreground connectivity in skimage's "orthogonal hops" form: 1 (4/6) or ``ndim`` (8/26, the default)."""
    conn = ndim if connectivity is None else connectivity
    if conn not in (1, ndim):
        raise ValueError(
            f"connectivity must be None, 1 (4/6-neighbourhood) or {ndim} (full, {3**ndim - 1}-neighbourhood) "
            f"for {ndim}D masks, got {connectivity!r}."
        )
    return conn


def betti_numbers(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Betti numbers of a binary 2D or 3D mask: ``[beta0, beta1]`` in 2D, ``[beta0, beta1, beta2]`` in 3D.

    Connectivity (skimage's convention, number of orthogonal hops): the foreground uses ``connectivity`` (default
    ``None`` = full: 8 in 2D, 26 in 3D) and the background the dual one (4 / 6); ``connectivity=1`` swaps them
    (foreground 4 / 6, background 8 / 26). Dual pairs make the digital topology consistent, so the Euler
    characteristic checks ``chi = beta0 - beta1`` (2D) and ``chi = beta0 - beta1 + beta2`` (3D) hold.

    - ``beta0``: foreground connected components;
    - 2D ``beta1``: holes = background components not touching the image border (the mask is padded with one
      background pixel, so the outside is one component);
    - 3D ``beta2``: cavities = enclosed background components (same padding); ``beta1 = beta0 + beta2 - chi``
      (tunnels / handles) with ``chi`` from :func:`skimage.measure.euler_number` at the same connectivity.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {mask.shape}.")
    conn = _full_connectivity(mask.ndim, connectivity)
    dual = 1 if conn == mask.ndim else mask.ndim
    beta0 = label(mask, connectivity=conn, return_num=True)[1]
    # the padded outside is one background component; every other one is enclosed (a hole in 2D, a cavity in 3D)
    enclosed = label(np.pad(~mask, 1, constant_values=True), connectivity=dual, return_num=True)[1] - 1
    if mask.ndim == 2:
        return np.array([beta0, enclosed], dtype=np.int64)
    chi = euler_number(mask, connectivity=conn)
    return np.array([beta0, beta0 + enclosed - chi, enclosed], dtype=np.int64)


def betti_number_error(pred: np.ndarray, target: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """``|beta_k(pred) - beta_k(target)|`` for k = 0, 1 (2D) or 0, 1, 2 (3D); see :func:`betti_numbers`."""
    return np.abs(betti_numbers(pred, connectivity) - betti_numbers(target, connectivity))


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """skimage skeleton (Zhang in 2D, Lee in 3D); a non-empty mask whose skeleton vanishes (Lee removes blobs of
    a few voxels, e.g. a 2x2x2 cube) keeps the mask itself, so it still counts."""
    skel = skeletonize(mask)
    return skel if skel.any() or not mask.any() else mask


def _empty_value(pred: np.ndarray, target: np.ndarray, ignore_empty: bool) -> float | None:
    """MONAI's ``ignore_empty``: NaN for an empty target when set; otherwise 1 if both are empty, 0 if exactly one
    is; ``None`` when both are non-empty (compute the score)."""
    if not target.any():
        return float("nan") if ignore_empty else float(not pred.any())
    return None if pred.any() else 0.0


def cldice(pred: np.ndarray, target: np.ndarray, ignore_empty: bool = True) -> float:
    """Hard clDice of two binary masks (2D or 3D), Shit et al., CVPR 2021::

        Tprec = |S(P) & L| / |S(P)|,  Tsens = |S(L) & P| / |S(L)|,  clDice = 2 Tprec Tsens / (Tprec + Tsens)

    with ``S`` the skimage skeleton (Zhang in 2D, Lee in 3D). Empty cases as :class:`monai.metrics.DiceMetric`:
    empty target -> NaN if ``ignore_empty`` else 1 when the prediction is empty too and 0 when it is not; empty
    prediction with a non-empty target -> 0. ``Tprec + Tsens = 0`` gives 0.
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    empty = _empty_value(pred, target, ignore_empty)
    if empty is not None:
        return empty
    skel_p, skel_t = _skeleton(pred), _skeleton(target)
    tprec = np.count_nonzero(skel_p & target) / np.count_nonzero(skel_p)
    tsens = np.count_nonzero(skel_t & pred) / np.count_nonzero(skel_t)
    return 0.0 if tprec + tsens == 0 else 2.0 * tprec * tsens / (tprec + tsens)


def delineation_scores(
    pred: np.ndarray,
    target: np.ndarray,
    tolerance: float = 2.0,
    skeletonize_inputs: bool = True,
    ignore_empty: bool = True,
) -> np.ndarray:
    """``[completeness, correctness, quality]`` of a predicted delineation, Wiedemann et al. 1998.

    With ``P`` and ``L`` the predicted and reference centrelines (skimage skeletons of the masks when
    ``skeletonize_inputs``, the masks themselves otherwise) and matching = Euclidean distance (scipy EDT, in
    pixels) to the other centreline ``<= tolerance``::

        TP = |{p in P matched}|,  FP = |P| - TP,  FN = |{l in L unmatched}|
        completeness = |{l in L matched}| / |L|,  correctness = TP / |P|,  quality = TP / (TP + FP + FN)

    Empty cases as :func:`cldice`: empty target -> all NaN if ``ignore_empty`` else all 1 (both empty) / all 0;
    empty prediction with a non-empty target -> all 0.
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    empty = _empty_value(pred, target, ignore_empty)
    if empty is not None:
        return np.full(3, empty)
    if skeletonize_inputs:
        pred, target = _skeleton(pred), _skeleton(target)
    # EDT of the complement = distance of every voxel to the nearest centreline voxel
    matched_p = pred & (distance_transform_edt(~target) <= tolerance)
    matched_l = target & (distance_transform_edt(~pred) <= tolerance)
    n_p, n_l = np.count_nonzero(pred), np.count_nonzero(target)
    tp, fn = np.count_nonzero(matched_p), n_l - np.count_nonzero(matched_l)
    # both centrelines are non-empty here (_skeleton never empties a non-empty mask)
    return np.array([(n_l - fn) / n_l, tp / n_p, tp / (n_p + fn)])


class _MaskMetric(CumulativeIterationMetric):
    """Shared input checks, per ``(b, c)`` numpy loop and MONAI reduction; subclasses score one pair of masks."""

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    @abstractmethod
    def _score(self, pred: np.ndarray, target: np.ndarray) -> float | np.ndarray:
        """Score of one boolean ``(*spatial)`` prediction / target pair: a float or a ``(K,)`` array."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Rows of scores for binarised one-hot ``y_pred`` and ``y`` of shape ``(B, C, *spatial)``, 2D or 3D.

        Raises:
            ValueError: when ``y_pred`` / ``y`` is not a tensor, not 4D/5D, of different shapes, or not binary.
        """
        for name, t in (("y_pred", y_pred), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.ndim not in (4, 5):
                raise ValueError(f"{name} must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(t.shape)}.")
            # binarised one-hot only: soft or label-map values would silently change the topology
            if not ((t == 0) | (t == 1)).all():
                raise ValueError(f"{name} must be binarised (values 0/1), e.g. AsDiscrete(argmax=True, to_onehot=C).")
        if y.shape != y_pred.shape:
            raise ValueError(f"y must have the shape of y_pred {tuple(y_pred.shape)}, got {tuple(y.shape)}.")
        if not self.include_background:
            y_pred, y = ignore_background(y_pred, y)
        pred, target = y_pred.detach().cpu().bool().numpy(), y.detach().cpu().bool().numpy()
        rows = [[self._score(p, t) for p, t in zip(ps, ts)] for ps, ts in zip(pred, target)]
        return torch.as_tensor(np.asarray(rows, dtype=np.float32), device=y_pred.device)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered rows over their first two dims (B, C) with MONAI's ``do_metric_reduction``
        (NaN entries excluded); a trailing K dimension is kept. Returns ``(metric, not_nans)`` with
        ``get_not_nans``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a torch.Tensor, got {type(data).__name__}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class BettiNumberError(_MaskMetric):
    """Betti number error per sample and class: ``|beta_k(pred) - beta_k(target)|``, k = 0, 1 (2D) / 0, 1, 2 (3D).

    ``beta0`` counts connected components, ``beta1`` holes (2D) or tunnels/handles (3D), ``beta2`` cavities (3D);
    see :func:`betti_numbers`. Connectivity: foreground full connectivity (8 in 2D, 26 in 3D) with the dual
    background connectivity (4 / 6) by default (``connectivity=None``); ``connectivity=1`` uses foreground 4 / 6
    and background 8 / 26. Lower is better; 0 means the same topology (not the same shape).

    Args:
        include_background: whether to score channel 0 (skipped by default, as MONAI's metrics when ``False``).
        reduction: MONAI :class:`~monai.utils.MetricReduction` of the rows over batch and class (NaN-free here).
        get_not_nans: whether :meth:`aggregate` also returns the ``not_nans`` count.
        connectivity: ``None`` (full foreground connectivity) or 1 (face connectivity), see above.
        per_dimension: ``False``: rows ``(B, C)`` with the errors summed over k (one number per class, as
            DiceMetric; a scalar after ``reduction="mean"``, usable as a ``key_val_metric``). ``True``: rows
            ``(B, C, K)`` with K = 2 (2D) or 3 (3D) errors in the order ``beta0, beta1[, beta2]``; reductions keep
            the last dimension (``"mean"`` -> ``(K,)``).

    Example::

        metric = BettiNumberError(per_dimension=True)
        metric(y_pred=one_hot_pred, y=one_hot_label)  # (B, C - 1, 2) for 2D inputs
        metric.aggregate()                            # (2,): mean beta0 and beta1 errors
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        connectivity: int | None = None,
        per_dimension: bool = False,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        if connectivity not in (None, 1, 2, 3):
            raise ValueError(f"connectivity must be None, 1, 2 (2D full) or 3 (3D full), got {connectivity!r}.")
        self.connectivity = connectivity
        self.per_dimension = per_dimension

    def _score(self, pred: np.ndarray, target: np.ndarray) -> float | np.ndarray:
        err = betti_number_error(pred, target, self.connectivity)
        return err if self.per_dimension else float(err.sum())


class ClDiceMetric(_MaskMetric):
    """Hard clDice per sample and class (Shit et al., CVPR 2021), see :func:`cldice`: the harmonic mean of
    topology precision ``|S(P) & L| / |S(P)|`` and topology sensitivity ``|S(L) & P| / |S(L)|`` with skimage
    skeletons (Zhang 2D, Lee 3D). Higher is better, rows ``(B, C)``.

    Args:
        include_background: whether to score channel 0.
        reduction: MONAI :class:`~monai.utils.MetricReduction` over the non-NaN rows.
        get_not_nans: whether :meth:`aggregate` also returns the ``not_nans`` count.
        ignore_empty: as :class:`monai.metrics.DiceMetric`: ``True`` gives NaN for an empty target class (left out
            of the reduction, counted by ``not_nans``); ``False`` gives 1 if the prediction is empty too, else 0.
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        ignore_empty: bool = True,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        self.ignore_empty = ignore_empty

    def _score(self, pred: np.ndarray, target: np.ndarray) -> float:
        return cldice(pred, target, self.ignore_empty)


class DelineationMetric(_MaskMetric):
    """Completeness, correctness and quality of a delineation per sample and class (Wiedemann et al. 1998), see
    :func:`delineation_scores`. Rows ``(B, C, 3)``, last dimension ``[completeness, correctness, quality]``;
    ``reduction="mean"`` gives ``(3,)``. Higher is better.

    By default both masks are skeletonised first (skimage, Zhang 2D / Lee 3D), so thick predictions are compared
    by their centrelines; matching uses the Euclidean distance in pixels (scipy EDT).

    Args:
        tolerance: matching distance in pixels (inclusive): a centreline pixel is matched when the other
            centreline has a pixel within this distance.
        include_background: whether to score channel 0.
        reduction: MONAI :class:`~monai.utils.MetricReduction` over the non-NaN rows (the last dim is kept).
        get_not_nans: whether :meth:`aggregate` also returns the ``not_nans`` count.
        skeletonize: whether to skeletonise prediction and target (``False``: the masks already are centrelines).
        ignore_empty: as :class:`ClDiceMetric` (NaN rows for an empty target class when ``True``).
    """

    def __init__(
        self,
        tolerance: float = 2.0,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        skeletonize: bool = True,
        ignore_empty: bool = True,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be a non-negative distance in pixels, got {tolerance!r}.")
        self.tolerance = float(tolerance)
        self.skeletonize = skeletonize
        self.ignore_empty = ignore_empty

    def _score(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        return delineation_scores(pred, target, self.tolerance, self.skeletonize, self.ignore_empty)
