"""The switch for segloss's fused autograd paths, and the guard that keeps their backward first-order.

A fused path is a ``torch.autograd.Function`` with a hand-written backward that replaces the plain autograd of the
same formula to save memory or time. Each sits behind one eligibility test at its call site, which starts with
:func:`fused_paths_enabled`; with the switch off every loss takes its plain autograd path (the benchmarks time
both: ``SEGLOSS_FUSED=0``).

The hand-written backwards are first-order only. Under ``create_graph=True`` (second derivatives) they raise
instead of returning a gradient without a graph, which would silently drop the loss's share of the second
derivative: switch the fused paths off for that (the plain paths are twice differentiable).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.autograd.function import once_differentiable

__all__ = ["first_order_only", "fused_paths_enabled", "set_fused_paths"]

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
