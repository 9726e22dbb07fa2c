"""The opt-in ``tolerance`` mode of the Lovász losses: the increments of the Lovász extension from per-bin counts of
the errors (one histogram over all rows) instead of a sort, within ``tolerance`` of the exact loss."""

from __future__ import annotations

import math

import torch

__all__ = ["binned_increments", "check_tolerance"]


def _jaccard_loss(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """``1 - I / U``, and 0 for the empty set (``U = 0``)."""
    return torch.where(union > 0, 1 - inter / union.clamp_min(1), 0.0)


def binned_increments(
    errors: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``tolerance`` mode of :class:`_LovaszExtension`: each voxel's increment (input order) and the per-row
    ground-truth totals, from per-bin counts instead of a sort; None where the exact sort applies instead.

    The errors of every row go into ``K = ceil(max error / tolerance)`` equal bins, in decreasing order. After all
    voxels of a bin, ``J`` depends only on the set so far, so the increments inside a bin sum to the same ``dJ`` in
    any order: the loss differs from the exact one by at most ``bin width * sum dJ <= tolerance`` per row (the
    increments are >= 0 and sum to at most 1). Inside a bin, with ``I0``, ``U0`` before it, ``f`` foreground and
    ``b`` background voxels: foreground first gives each foreground voxel ``1 / U0`` and the background voxels
    ``J(I0 - f, U0 + b) - J(I0 - f, U0)``; background first gives them ``J(I0, U0 + b) - J(I0, U0)`` and each
    foreground voxel ``1 / (U0 + b)``. Each voxel gets the mean of the two (per voxel, for the background).
    """
    if gt.dtype != torch.bool:
        if not bool(((gt == 0) | (gt == 1)).all()):
            return None  # soft ground truth: the per-bin counts below are for binary voxels
        gt = gt.bool()
    shape, N = errors.shape, errors.shape[-1]
    errors = errors.reshape(-1, N)
    R = errors.shape[0]
    gt = gt.expand(shape).reshape(R, N)
    valid = None if valid is None else valid.expand(shape).reshape(R, N)
    emax = float(errors.amax()) if errors.numel() else 0.0
    K = max(1, math.ceil(emax / tolerance))
    if K > N:  # more bins than voxels: the sort is exact and not slower
        return None
    scale = K / emax if emax > 0 else 0.0
    key = (emax - errors).mul_(scale).to(torch.int64).clamp_(0, K - 1)  # bin, 0 = largest errors
    row = torch.arange(R, device=errors.device).unsqueeze(1) * (2 * K)
    key = key.mul_(2).add_(row).add_(gt)  # flat index of (row, bin, foreground)
    w = None if valid is None else valid.reshape(-1).to(errors.dtype)
    counts = torch.bincount(key.view(-1), w, minlength=R * K * 2).view(R, K, 2).double()
    n_bg, n_fg = counts.unbind(-1)
    total = n_fg.sum(-1, keepdim=True)
    inter0 = total - (n_fg.cumsum(-1) - n_fg)  # I0: foreground not yet in the predicted-wrong set
    union0 = total + (n_bg.cumsum(-1) - n_bg)  # U0
    union1 = union0 + n_bg
    inc_fg = 0.5 * (1 / union0.clamp_min(1) + 1 / union1.clamp_min(1))
    bg_fg_first = _jaccard_loss(inter0 - n_fg, union1) - _jaccard_loss(inter0 - n_fg, union0)
    bg_bg_first = _jaccard_loss(inter0, union1) - _jaccard_loss(inter0, union0)
    inc_bg = 0.5 * (bg_fg_first + bg_bg_first) / n_bg.clamp_min(1)
    table = torch.stack([inc_bg, inc_fg], -1).to(errors.dtype).view(-1)
    inc = table.take(key)
    if valid is not None:
        inc.masked_fill_(~valid, 0.0)
    return inc.view(shape), total.to(errors.dtype).view(shape[:-1])


def check_tolerance(tolerance: float | None) -> float | None:
    if tolerance is None:
        return None
    tolerance = float(tolerance)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"`tolerance` must be None (exact) or a finite positive float, got {tolerance}.")
    return tolerance
