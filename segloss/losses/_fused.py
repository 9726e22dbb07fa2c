"""The switch for segloss's fused autograd paths, and the guard that keeps their backward first-order.

A fused path is a ``torch.autograd.Function`` with a hand-written backward that replaces the plain autograd of the
same formula to save memory or time. Each sits behind one eligibility test at its call site, which starts with
:func:`fused_paths_enabled`; with the switch off every loss takes its plain autograd path (the benchmarks time
both: ``SEGLOSS_FUSED=0``).

The hand-written backwards are first-order only. Under ``create_graph=True`` (second derivatives) they raise
instead of returning a gradient without a graph, which would silently drop the loss's share of the second
derivative: switch the fused paths off for that (the plain paths are twice differentiable).

Measured gains: ``python benchmarks/losses.py --losses cross_entropy focal dice generalized_dice tversky
focal_tversky dice_ce dice_focal --rounds 3 --plain`` (quiet 2-core CPU, 2 threads, 2026-12-07, no GPU available),
fused / plain of the same run on the cases 8x4x256^2, 2x4x96^3, 1x14x96^3, 1x32x128^3, in each class's docstring.
Single rounds of one entry scattered by up to +-30 % on that machine, so time ratios within 0.85-1.15 are a tie;
``docs/benchmarks.md`` has the whole table.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.autograd.function import once_differentiable

from segloss.losses.class_sums import all_reduce_sum, batch_sums, label_sums

__all__ = [
    "LabelCrossEntropy",
    "SigmoidFocalAtLabel",
    "SoftmaxFocalAtLabel",
    "SoftmaxLabelStats",
    "first_order_only",
    "fused_paths_enabled",
    "set_fused_paths",
]

_ENABLED = os.environ.get("SEGLOSS_FUSED", "1") != "0"


def set_fused_paths(enabled: bool) -> None:
    """Turn the fused paths of every segloss loss on (default) or off (plain autograd, twice differentiable).

    The environment variable ``SEGLOSS_FUSED=0`` sets the default to off.
    """
    global _ENABLED
    _ENABLED = bool(enabled)


def fused_paths_enabled() -> bool:
    return _ENABLED


def first_order_only(backward):
    """``once_differentiable`` for a fused backward, raising a clear error under ``create_graph=True``."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
            raise RuntimeError(
                f"segloss's fused backward ({type(ctx).__name__.removesuffix('Backward')}) gives first derivatives "
                "only, and create_graph=True asks for second derivatives; call "
                "segloss.losses.set_fused_paths(False) (or set SEGLOSS_FUSED=0) to use the plain autograd paths."
            )
        return inner(ctx, *grads)

    return wrapper


class SoftmaxLabelStats(torch.autograd.Function):
    r"""Softmax + per-class sums of :func:`~segloss.losses.class_sums.class_sums` for an integer label map ``t``, with
    an optional fused cross-entropy sum, and a closed-form backward that allocates one ``(B, C, N)`` tensor.

    Autograd through ``softmax -> gather/scatter/sum`` keeps ``p``, a scattered gradient, their sum and the
    softmax gradient alive at once; here only ``p`` and the ``(B, N)`` weighted probability at the label are
    saved. With ``a = dL/dP``, ``b = dL/dtp`` (``(B, C)``), voxel weight ``w``, the CE voxel weight
    ``v = w cw_t`` (class weight of the label) and ``k_v = dL/dCE v_v``:

    .. math::

        H_c = w p_c a_c \; (2 w p_c^2 a_c \text{ with squared\_pred}) + [c = t]\, w p_t b_t, \qquad
        \frac{\partial L}{\partial x_c} = H_c - p_c \sum_k H_k + k (p_c - [c = t])

    where ``sum_k w p_k a_k`` is one ``(1, C) @ (C, N)`` product per item. ``batch`` / ``sync_batch`` reduce the
    sums as :func:`~segloss.losses.class_sums.batch_sums` does; the backward then broadcasts the ``(C,)`` gradients
    over the batch and, with ``sync_batch``, all-reduces them as the autograd all-reduce would. First-order only
    (:func:`~segloss.losses._fused.first_order_only`).

    Measured (the run of the module docstring), fused / plain per case: time a tie (Dice 0.77, 0.90, 0.98, 1.22;
    Generalized Dice 1.44, 0.92, 0.77, 0.98), memory 32 / 84 / 114 / 546 MB against 35 / 96 / 154 / 785 MB. It stays
    for the memory: with the plain path the Dice family peaks at 0.63x / 0.61x MONAI's DiceCE on the 14- / 32-class
    cases (target 0.6x), with it at 0.47x / 0.42x. With ``with_ce`` (DiceCE: its CE term from the same
    softmax): time 0.54, 0.84, 0.67, 0.54, memory 122 / 570 MB against 202 / 1042 MB on the 14- / 32-class
    cases.
    """

    @staticmethod
    def forward(ctx, xin, tgt, squared_pred, batch, sync_batch, ce_voxel_weight, with_ce):
        x = xin.reshape(*xin.shape[:2], -1)
        ctx.in_shape = xin.shape
        labels, w = tgt.labels, tgt.weight  # (B, N), (B, 1, N) or None
        ce_sum = x.new_zeros(())
        if with_ce:
            p = torch.log_softmax(x, 1)
            nll = -p.gather(1, labels.unsqueeze(1))  # (B, 1, N)
            ce_sum = (nll if ce_voxel_weight is None else nll * ce_voxel_weight).sum()
            p = p.exp_()  # one (B, C, N) buffer for log p, then p
        else:
            p = torch.softmax(x, 1)
        tp, ps, ts, pw_at_label = label_sums(p, labels, w, squared_pred=squared_pred)
        tp, ps, ts = batch_sums(tp, ps, ts, batch=batch, sync_batch=sync_batch)
        ctx.save_for_backward(p, labels, w, ce_voxel_weight, pw_at_label)
        ctx.flags = (squared_pred, batch, sync_batch, with_ce)
        ctx.mark_non_differentiable(ts)
        return tp, ps, ts, ce_sum

    @staticmethod
    @first_order_only
    def backward(ctx, g_tp, g_ps, _g_ts, g_ce):
        p, labels, w, ce_voxel_weight, pw_at_label = ctx.saved_tensors
        squared_pred, batch, sync_batch, with_ce = ctx.flags
        if sync_batch:
            g_tp, g_ps = all_reduce_sum(torch.stack([g_tp, g_ps])).unbind(0)
        B = p.shape[0]
        if batch:
            g_tp, g_ps = g_tp.expand(B, -1), g_ps.expand(B, -1)
        grad_in = p.new_empty(ctx.in_shape)
        grad = grad_in.view(p.shape)
        a = g_ps.unsqueeze(-1)  # (B, C, 1)
        if squared_pred:
            torch.mul(p, a, out=grad).mul_(p).mul_(2)  # H without the label term
            if w is not None:
                grad.mul_(w)
            h_sum = grad.sum(1, keepdim=True)
        else:  # sum_k w p_k a_k as a matrix product: one read of p
            h_sum = torch.bmm(g_ps.unsqueeze(1), p)
            if w is not None:
                h_sum = h_sum * w
        at_label = (pw_at_label * g_tp.gather(1, labels)).unsqueeze(1)  # w p_t b_t, (B, 1, N)
        coef = h_sum.add_(at_label)  # sum_k H_k
        if with_ce:  # without the CE term k is 0: skip its two passes
            k = g_ce.expand(B, 1, labels.shape[1]) if ce_voxel_weight is None else g_ce * ce_voxel_weight
            coef, at_label = coef - k, at_label - k
        if squared_pred:
            grad.addcmul_(p, coef, value=-1)
        else:  # p_c (w a_c - coef): broadcast into the output, then one product with p
            if w is None:
                torch.sub(a, coef, out=grad)
            else:
                torch.mul(w, a, out=grad).sub_(coef)
            grad.mul_(p)
        grad.scatter_add_(1, labels.unsqueeze(1), at_label)
        return grad_in, None, None, None, None, None, None


class LabelCrossEntropy(torch.autograd.Function):
    """``sum_v v_v (-log softmax(x_v)_{t_v})`` for logits ``x`` ``(B, C, N)``, a label map ``t`` ``(B, N)`` and voxel
    weights ``v`` ``(B, 1, N)`` (or None), keeping no ``(B, C, N)`` tensor for the backward.

    torch's cross-entropy saves the log-softmax and its backward allocates two more ``(B, C, N)`` tensors; here the
    log-softmax is freed after the gather and the backward recomputes the softmax from ``x`` (which autograd holds
    anyway) into the one tensor it returns: ``dL/dx_c = g v (p_c - [c == t])``. First-order only (:func:`~segloss.losses._fused.first_order_only`).

    Measured (the run of the module docstring), fused / plain per case: time 0.62, 0.67, 1.11, 0.61; memory 17 / 41
    / 58 / 271 MB against 31 / 88 / 149 / 775 MB.
    """

    @staticmethod
    def forward(ctx, x, labels, v):
        nll = torch.log_softmax(x, 1).gather(1, labels.unsqueeze(1)).neg_()
        ctx.save_for_backward(x, labels, v)
        return (nll if v is None else nll.mul_(v)).sum()

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        x, labels, v = ctx.saved_tensors
        grad = torch.softmax(x, 1)
        k = g.expand(labels.shape[0], 1, labels.shape[1]) if v is None else v * g
        grad.mul_(k).scatter_add_(1, labels.unsqueeze(1), -k)
        return grad, None, None


class SoftmaxFocalAtLabel(torch.autograd.Function):
    """Per-voxel softmax focal term at the label: logits ``(B, C, N)``, labels ``(B, N)`` -> ``(B, N)``.

    Forward: ``f(p_t) = -(1 - p_t)^gamma log p_t`` with ``log p = log_softmax(x)``. Backward in closed form,
    saving only ``log p`` (as ``F.cross_entropy`` does)::

        df/dx_c = p_t f'(p_t) ([c == t] - p_c),   p f'(p) = (1 - p)^gamma (gamma p log(p) / (1 - p) - 1)

    where ``log(p) / (1 - p) -> -1`` as ``p -> 1`` (so ``gamma < 1`` stays finite), and ``1 - p_t`` is
    ``-expm1(log p_t)``, accurate near ``p_t = 1``. The forward's per-voxel factors ``1 - p_t`` and its power are
    saved for the backward (each ``(B, N)``, ``1/C`` of the log-probabilities). First-order only (:func:`~segloss.losses._fused.first_order_only`).

    Measured (the run of the module docstring), fused / plain per case: time 0.80, 0.93, 1.02, 0.72; memory 44 / 126
    / 135 / 595 MB against 39 / 157 / 164 / 833 MB.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
        logp = torch.log_softmax(logits, 1)
        logp_t = logp.gather(1, labels.unsqueeze(1)).squeeze(1)
        q = torch.expm1(logp_t).neg_()  # 1 - p_t
        q_gamma = q.pow(gamma)
        ctx.save_for_backward(logp, labels, logp_t, q, q_gamma)
        ctx.gamma = gamma
        return (q_gamma * logp_t).neg_()

    @staticmethod
    @first_order_only
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logp, labels, logp_t, q, q_gamma = ctx.saved_tensors
        gamma = ctx.gamma
        log_ratio = torch.where(q > 0, logp_t / q, -1.0)
        coef = grad * q_gamma * (gamma * (1 - q) * log_ratio - 1)  # grad * p_t f'(p_t)
        grad_logits = logp.exp().mul_(-coef.unsqueeze(1))
        grad_logits.scatter_add_(1, labels.unsqueeze(1), coef.unsqueeze(1))
        return grad_logits, None, None


_MIN_BLOCK = 1 << 16


def _blocks(x: torch.Tensor, labels: torch.Tensor, start: int, n_buffers: int):
    """``(c, columns, mask, buffers)`` over the channels ``c >= start`` of ``(B, C, N)`` logits and blocks of
    columns: ``mask = labels[:, columns] == c`` marks the block's positives (voxels labelled ``c``) and
    ``buffers`` are ``n_buffers`` float work tensors of the block's shape ``(B, K)``.

    A block is one channel's slice of at most ``max(B C N / 8, 2^16)`` elements, so the temporaries stay well
    below the input's size while few enough blocks keep kernel launches (and CPU intra-op thread hand-offs) few.
    The work tensors are allocated once and reused through ``out=`` / in-place ops: per-block allocations would
    leave a fragmented CPU heap several blocks large behind them."""
    B, C, N = x.shape
    step = min(N, max(1, max(x.numel() // 8, _MIN_BLOCK) // B))
    work = x.new_empty(n_buffers, B * step)
    mask_work = torch.empty(B * step, dtype=torch.bool, device=x.device)
    for i in range(0, N, step):
        cols = slice(i, min(i + step, N))
        size = B * (cols.stop - i)
        buffers = [buf[:size].view(B, -1) for buf in work]
        mask = mask_work[:size].view(B, -1)
        t = labels[:, cols]
        for c in range(start, C):
            yield c, cols, torch.eq(t, c, out=mask), buffers


def _focal_parts(x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor, sp: torch.Tensor) -> None:
    """``sp = softplus(z)`` and ``z = logsigmoid(z) = z - softplus(z)``, written into the given buffers, for
    ``z = -x`` at ``mask`` (positives) and ``z = x`` elsewhere (negatives): the element's BCE is ``softplus(z)``
    and its ``1 - p_t`` is ``sigmoid(z)``."""
    torch.addcmul(x, x, mask, value=-2, out=z)
    torch.logaddexp(z, z.new_zeros(()), out=sp)
    z.sub_(sp)


class SigmoidFocalAtLabel(torch.autograd.Function):
    """Sigmoid focal loss of logits ``(B, C, *)`` (spatial dims flattened to ``N`` here) against a label map
    ``(B, N)`` standing for one-hot channels, over the channels ``c >= start``: ``(B, N)`` summed over them, or
    per element ``(B, C - start, N)``.

    Per element, ``z = -x`` for the label's channel (a positive) and ``z = x`` for the others (negatives)::

        l = a f(z),  f(z) = softplus(z) sigmoid(z)^gamma = softplus(z) exp(gamma logsigmoid(z))
        dl/dx = -+ a f'(z),  f'(z) = sigmoid(z)^gamma (sigmoid(z) + gamma softplus(z) sigmoid(-z))

    (``-`` for positives), ``a = factors[0, c - start]`` for positives and ``factors[1, c - start]`` for
    negatives (alpha times class weight; 1 if ``factors`` is None). Each factor is a product of bounded terms
    (``sigmoid(-z) softplus(z) <= 1``), so values and gradients are finite for any finite logit and ``gamma >= 0``.

    Autograd through the same maths keeps ~7 ``(B, C, N)`` tensors in forward and allocates ~10 in backward.
    Here backward saves only the logits and labels and recomputes, and both passes loop over the channels and
    column blocks (:func:`_blocks`): each element is still read once per pass, but the temporaries are one
    block's, so the only full-size allocation is the input gradient (plus the output for ``per_element``).
    The logits are flattened inside, so that the gradient returned is not a view: autograd can then add another
    term's gradient (DiceFocal's Dice) into it in place instead of allocating their sum. First-order only (:func:`~segloss.losses._fused.first_order_only`).

    Measured (the run of the module docstring; DiceFocal with all its fused parts), fused / plain per case: time
    0.88, 0.71, 0.70, 0.95; memory 37 / 100 / 140 / 596 MB against 124 / 240 / 356 / 1874 MB.
    """

    @staticmethod
    def forward(ctx, input, labels, gamma, start, factors, per_element):
        x = input.reshape(*input.shape[:2], -1)
        B, C, N = x.shape
        out = x.new_zeros(B, C - start, N) if per_element else x.new_zeros(B, N)
        for c, cols, mask, (z, sp, a) in _blocks(x, labels, start, 3):
            _focal_parts(x[:, c, cols], mask, z, sp)
            e = z.mul_(gamma).exp_()  # sigmoid(z)^gamma
            if factors is not None:
                e.mul_(torch.where(mask, factors[0, c - start], factors[1, c - start], out=a))
            (out[:, c - start, cols] if per_element else out[:, cols]).addcmul_(sp, e)
        ctx.save_for_backward(input, labels, factors)
        ctx.options = gamma, start, per_element
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        input, labels, factors = ctx.saved_tensors
        gamma, start, per_element = ctx.options
        x = input.reshape(*input.shape[:2], -1)
        C = x.shape[1]
        grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
        grad_x = grad_input.view(x.shape)
        grad_x[:, :start].zero_()
        # dl/dx = sign(dz/dx) a f'(z): -a_pos at the positives, a_neg at the negatives, per channel
        signs = (x.new_ones(2, C - start) if factors is None else factors) * x.new_tensor([[-1.0], [1.0]])
        for c, cols, mask, (d, sp, e) in _blocks(x, labels, start, 3):
            _focal_parts(x[:, c, cols], mask, d, sp)
            d.exp_()  # sigmoid(z)
            if gamma != 0:
                torch.pow(d, gamma, out=e)
                sp.addcmul_(sp, d, value=-1)  # softplus(z) sigmoid(-z)
                d.add_(sp, alpha=gamma).mul_(e)
            d.mul_(torch.where(mask, signs[0, c - start], signs[1, c - start], out=e))
            torch.mul(d, grad[:, c - start, cols] if per_element else grad[:, cols], out=grad_x[:, c, cols])
        return grad_input, None, None, None, None, None
