"""Per-class soft confusion sums ``(tp, sum p, sum g)`` of activated predictions against a prepared target: float32
with autocast off, gathered/scattered at the labels of a label map (never a one-hot copy), summed over the batch
and all-reduced across ``torch.distributed`` ranks with autograd on request."""

from __future__ import annotations

import torch
import torch.distributed as dist

from segloss.losses.inputs import Target, _plain

__all__ = ["all_reduce_sum", "batch_sums", "class_sums", "label_sums", "sum_by_label"]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ``torch.distributed`` ranks, differentiably.

    The backward pass sums the incoming gradients over ranks as well. Every rank computes the same loss
    from the summed statistics, so each rank's input gradient is ``world_size`` times its share of the
    one-process gradient, which is exactly what DistributedDataParallel's gradient *averaging* expects:
    after DDP, parameter gradients equal those of one process holding the whole batch. Without an
    initialised process group this is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)


def class_sums(
    pred: torch.Tensor,
    target: Target,
    *,
    batch: bool = False,
    squared_pred: bool = False,
    soft_label: bool = False,
    sync_batch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class soft confusion statistics ``(tp, pred_sum, target_sum)``, each ``(B, C)`` or ``(C,)``.

    ``tp = sum_v w_v p_vc g_vc``, ``pred_sum = sum_v w_v p_vc`` (``p^2`` when ``squared_pred``),
    ``target_sum = sum_v w_v g_vc`` (``g^2`` when ``squared_pred``); so ``fp = pred_sum - tp`` and
    ``fn = target_sum - tp``. With ``soft_label`` (dense targets, MONAI's option) ``tp`` is
    ``(|p|+|g|-|p-g|)/2`` in the L1 (or squared L2) norm, exact for soft labels.

    For a label map ``g`` is never materialised: ``tp`` sums ``p`` at each voxel's label by class and
    ``target_sum`` the voxel weights (:func:`sum_by_label`). Sums are float32 with autocast off; ``batch`` sums over
    the batch, and ``sync_batch`` (with ``batch``) all-reduces the sums across ranks (:func:`all_reduce_sum`).

    Args:
        pred: ``(B, C, *)`` probabilities (already activated).
        target: from :func:`prepare_target` for the same input.
    """
    B, C = pred.shape[:2]
    with torch.autocast(pred.device.type, enabled=False):
        p = _plain(pred).float().reshape(B, C, -1)
        w = target.weight
        if target.labels is not None:
            tp, pred_sum, target_sum, _ = label_sums(p, target.labels, w, squared_pred=squared_pred)
        else:
            g = target.dense
            if soft_label:
                if w is not None:
                    # each norm term is a per-voxel sum of |.| (or |.|^2): scale by w (or sqrt(w)) so every voxel
                    # counts w times; for a 0/1 ignore mask this is MONAI's masking of p and g
                    s = w.sqrt() if squared_pred else w
                    p, g = p * s, g * s
                order = 2 if squared_pred else 1
                pn = torch.linalg.vector_norm(p, ord=order, dim=-1)
                gn = torch.linalg.vector_norm(g, ord=order, dim=-1)
                dn = torch.linalg.vector_norm(p - g, ord=order, dim=-1)
                if order == 2:
                    pn, gn, dn = pn.square(), gn.square(), dn.square()
                tp = (pn + gn - dn) / 2
                pred_sum, target_sum = pn, gn
            else:
                # w is (B,1,N) or (B,C,N); it multiplies each voxel's term once (a label map gets the same sums)
                pw = p if w is None else p * w
                tp = (pw * g).sum(-1)
                pred_sum = (pw * p).sum(-1) if squared_pred else pw.sum(-1)
                gw = g if w is None else g * w
                target_sum = (gw * g).sum(-1) if squared_pred else gw.sum(-1)
        return batch_sums(tp, pred_sum, target_sum, batch=batch, sync_batch=sync_batch)


def label_sums(
    p: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, *, squared_pred: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The label-map half of :func:`class_sums`: ``(tp, pred_sum, target_sum)`` per item, ``(B, C)``, plus the
    weighted probability at each voxel's label ``w_v p_{v,t_v}``, ``(B, N)``, which a closed-form backward reuses.

    ``p`` is ``(B, C, N)`` float32, ``labels`` ``(B, N)`` int64 in ``[0, C)``, ``weight`` ``(B, 1, N)`` or None.
    """
    B, C = p.shape[:2]
    w = None if weight is None else weight[:, 0]
    pp = p * p if squared_pred else p
    # pred_sum first, while p (just written by the activation) may still be in cache
    pred_sum = pp.sum(-1) if w is None else torch.bmm(pp, w.unsqueeze(-1)).squeeze(-1)
    p_at_label = p.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B, N)
    if w is not None:
        p_at_label = p_at_label * w
    tp = sum_by_label(labels, p_at_label, C)
    target_sum = sum_by_label(labels, w, C)
    return tp, pred_sum, target_sum, p_at_label


# voxels per row of sum_by_label's scatter: rows are what the CPU kernel parallelises over
_ROW = 1 << 14


def sum_by_label(labels: torch.Tensor, values: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Sum of ``values`` (``(B, N)`` float; None counts voxels) over the voxels of each label: ``(B, num_classes)``.

    A ``scatter_add_`` into one row of ``num_classes`` sums per block of ``2^14`` voxels, then a sum over the
    blocks. torch's CPU scatter runs the rows in parallel (a row per item would leave cores idle; ``bincount`` is
    serial and first makes two range passes); on the GPU the many rows spread the atomic adds. No ``(B, N)``
    offset-bin copy of the labels is made, and ``values`` keep their gradient.
    """
    B, N = labels.shape
    src = values if values is not None else torch.ones((), device=labels.device).expand(B, N)
    blocks = N // _ROW
    if blocks < 2:
        return src.new_zeros(B, num_classes).scatter_add_(1, labels, src)
    head = blocks * _ROW
    sums = src.new_zeros(B, blocks, num_classes)
    sums = sums.scatter_add_(2, labels[:, :head].view(B, blocks, _ROW), src[:, :head].view(B, blocks, _ROW)).sum(1)
    if head < N:
        sums = sums.scatter_add_(1, labels[:, head:], src[:, head:])
    return sums


def batch_sums(
    tp: torch.Tensor, pred_sum: torch.Tensor, target_sum: torch.Tensor, *, batch: bool, sync_batch: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item sums ``(B, C)`` as they leave :func:`class_sums`: summed over the batch with ``batch``, then
    all-reduced across ranks with ``sync_batch``."""
    if batch:
        tp, pred_sum, target_sum = tp.sum(0), pred_sum.sum(0), target_sum.sum(0)
        if sync_batch:
            tp, pred_sum, target_sum = all_reduce_sum(torch.stack([tp, pred_sum, target_sum])).unbind(0)
    return tp, pred_sum, target_sum
