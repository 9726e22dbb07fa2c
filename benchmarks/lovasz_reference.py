"""The Lovász losses the textbook way: Python loops over images and classes, straight from Alg. 1 of Berman,
Rannen Triki and Blaschko, "The Lovász-Softmax loss", CVPR 2018 (their reference code's ``lovasz_grad``).

Used as the float64 reference of ``tests/losses/test_lovasz.py`` and as the "loop" entry of ``benchmarks/losses.py``.
It follows the conventions of :class:`segloss.LovaszSoftmaxLoss` / :class:`segloss.LovaszHingeLoss` (classes used,
weights normalised over them, images without a used class left out) but shares no code with them: ignored voxels
are removed (compacted) and every (image, class) vector is sorted on its own.
"""

from __future__ import annotations

import torch


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. the sorted errors (Alg. 1):
    ``J_k - J_{k-1}`` with ``J_k = 1 - |G \\ first k| / |G ∪ first k|``."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def lovasz_flat(errors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Lovász extension of the Jaccard loss at ``errors`` (1D) for the ground truth ``gt`` (1D)."""
    if errors.numel() == 0:
        return errors.sum() * 0
    errors_sorted, perm = torch.sort(errors, descending=True, stable=True)
    return torch.dot(errors_sorted, lovasz_grad(gt[perm]))


def _mean_over_classes(losses: list, weights: list):
    wsum = sum(weights)
    return sum(w * v for w, v in zip(weights, losses)) / wsum if wsum > 0 else None


def lovasz_softmax_loop(
    prob: torch.Tensor,
    onehot: torch.Tensor,
    valid: torch.Tensor,
    *,
    classes="present",
    per_image=False,
    weight=None,
    start=0,
) -> torch.Tensor:
    """Lovász-Softmax of probabilities ``prob`` ``(B, C, *)`` against ``onehot`` ``(B, C, *)`` with the voxel mask
    ``valid`` ``(B, *)`` (False = ignored); class weights per channel from ``start`` (1 without background)."""
    B, C = prob.shape[:2]
    prob, onehot, valid = prob.reshape(B, C, -1), onehot.reshape(B, C, -1), valid.reshape(B, -1)
    sel = list(range(start, C)) if isinstance(classes, str) else list(classes)
    groups = [[b] for b in range(B)] if per_image else [list(range(B))]
    image_losses = []
    for group in groups:
        losses, weights = [], []
        for c in sel:
            e, g = [], []
            for b in group:
                m = valid[b]
                e.append((onehot[b, c][m] - prob[b, c][m]).abs())
                g.append(onehot[b, c][m])
            e, g = torch.cat(e), torch.cat(g)
            if e.numel() == 0 or (classes == "present" and g.sum() == 0):
                continue
            losses.append(lovasz_flat(e, g))
            weights.append(1.0 if weight is None else float(weight[c - start]))
        image_losses.append(_mean_over_classes(losses, weights))
    kept = [v for v in image_losses if v is not None]
    return sum(kept) / len(kept) if kept else prob.sum() * 0


def lovasz_hinge_loop(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, *, per_image=False) -> torch.Tensor:
    """Lovász hinge of ``logits`` ``(B, C, *)`` against binary ``gt`` ``(B, C, *)``, each channel its own hinge;
    ``valid`` ``(B, C, *)`` (False = ignored)."""
    B, C = logits.shape[:2]
    logits, gt, valid = logits.reshape(B, C, -1), gt.reshape(B, C, -1), valid.reshape(B, C, -1)
    groups = [[b] for b in range(B)] if per_image else [list(range(B))]
    image_losses = []
    for group in groups:
        losses = []
        for c in range(C):
            x = torch.cat([logits[b, c][valid[b, c]] for b in group])
            g = torch.cat([gt[b, c][valid[b, c]] for b in group])
            if x.numel() == 0:
                continue
            errors = 1 - x * (2 * g - 1)
            errors_sorted, perm = torch.sort(errors, descending=True, stable=True)
            losses.append(torch.dot(torch.relu(errors_sorted), lovasz_grad(g[perm])))
        image_losses.append(_mean_over_classes(losses, [1.0] * len(losses)))
    kept = [v for v in image_losses if v is not None]
    return sum(kept) / len(kept) if kept else logits.sum() * 0
