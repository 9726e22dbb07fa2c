"""Sums of losses: :class:`CompoundLoss`, named and weighted terms, bundle-config friendly."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["WEIGHTING_KEYWORDS", "CompoundLoss", "call_loss"]


def _accepted_kwargs(loss: nn.Module) -> set[str] | None:
    """Keyword names ``loss.forward`` accepts beyond (input, target); None if it takes ``**kwargs``."""
    params = inspect.signature(loss.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


# Keywords that weigh the loss: a loss that cannot take one would silently mean something else, so it raises.
# Other keywords (an alternative target such as ``skeleton``) reach only the losses that take them.
WEIGHTING_KEYWORDS = frozenset({"weight_map"})


def call_loss(loss: nn.Module, input: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """Call ``loss(input, target, **kwargs)`` with the keyword arguments its ``forward`` takes.

    Lets a ``skeleton`` reach the terms that use it while plain MONAI losses in the same sum are called as
    ``loss(input, target)``.

    Raises:
        TypeError: naming the keyword and the loss when a weighting keyword (``weight_map``) reaches a loss whose
            ``forward`` does not take it (e.g. a Lovász loss or a plain MONAI loss): the loss would silently
            be unweighted. In a :class:`CompoundLoss`, ``term_kwargs`` keeps it away from such a term.
    """
    if kwargs:
        accepted = _accepted_kwargs(loss)
        if accepted is not None:
            dropped = sorted((set(kwargs) - accepted) & WEIGHTING_KEYWORDS)
            if dropped:
                raise TypeError(
                    f"{type(loss).__name__}.forward takes no {', '.join(f'`{k}`' for k in dropped)}, so it would "
                    "be left unweighted. Do not pass it to this loss, or in a CompoundLoss leave it out of this "
                    "term's `term_kwargs` (e.g. term_kwargs={'<term>': []})."
                )
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return loss(input, target, **kwargs)


class CompoundLoss(nn.Module):
    """Weighted sum of named loss terms: ``sum_k weights[k] * losses[k](input, target)``.

    Any callable ``nn.Module`` loss works as a term (segloss or MONAI). Keyword arguments of ``forward`` (e.g.
    ``weight_map``, ``skeleton``) go to every term, or, for a term named in ``term_kwargs``, only the keywords
    listed there (e.g. keep the border weight map away from a Dice term). A term whose ``forward`` does not take a
    keyword is called without it, except ``weight_map``: that raises ``TypeError`` naming both (:func:`call_loss`)
    unless ``term_kwargs`` leaves it out for that term, so no term is left unweighted without a word.
    The detached value of each term from the last call is kept in :attr:`last_terms` for logging.

    From a MONAI bundle config::

        "loss": {
            "_target_": "segloss.losses.CompoundLoss",
            "losses": {
                "ce": {"_target_": "segloss.losses.WeightedCrossEntropyLoss"},
                "dice": {"_target_": "segloss.losses.DiceLoss", "softmax": true, "to_onehot_y": true}
            },
            "weights": {"ce": 1.0, "dice": 1.0}
        }

    Args:
        losses: a mapping name -> loss module, or a sequence of modules (named ``"0"``, ``"1"``, ...).
        weights: a mapping name -> weight, or a sequence in the order of ``losses``; missing weights default to 1.
            Weights may be changed between steps with :meth:`set_weight` (e.g. by a schedule).
        term_kwargs: optional mapping term name -> the ``forward`` keyword names that term receives (``[]`` for
            none); terms not named receive every keyword.
    """

    def __init__(
        self,
        losses: Mapping[str, nn.Module] | Sequence[nn.Module],
        weights: Mapping[str, float] | Sequence[float] | None = None,
        term_kwargs: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(losses, Mapping):
            named = dict(losses)
        else:
            named = {str(i): loss for i, loss in enumerate(losses)}
        if not named:
            raise ValueError("`losses` must hold at least one loss term.")
        for name, loss in named.items():
            if not callable(loss):
                raise TypeError(f"`losses[{name!r}]` must be a callable loss module, got {type(loss).__name__}.")
        self.losses = nn.ModuleDict(named)
        if weights is None:
            weights = {}
        elif not isinstance(weights, Mapping):
            weights = list(weights)
            if len(weights) != len(named):
                raise ValueError(f"`weights` has {len(weights)} entries for {len(named)} loss terms.")
            weights = dict(zip(named, weights))
        unknown = set(weights) - set(named)
        if unknown:
            raise ValueError(f"`weights` names unknown loss terms {sorted(unknown)}; terms are {list(named)}.")
        self.weights: dict[str, float] = {}
        for name in named:
            self.set_weight(name, weights.get(name, 1.0))
        term_kwargs = dict(term_kwargs or {})
        unknown = set(term_kwargs) - set(named)
        if unknown:
            raise ValueError(f"`term_kwargs` names unknown loss terms {sorted(unknown)}; terms are {list(named)}.")
        self.term_kwargs = {name: frozenset(keys) for name, keys in term_kwargs.items()}
        self.last_terms: dict[str, torch.Tensor] = {}

    def set_weight(self, name: str, value: float) -> None:
        if name not in self.losses:
            raise KeyError(f"no loss term named {name!r}; terms are {list(self.losses)}.")
        value = float(value)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"weight of term {name!r} must be finite and >= 0, got {value}.")
        self.weights[name] = value

    def forward(self, input: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        total = None
        terms = {}
        for name, loss in self.losses.items():
            w = self.weights[name]
            if w == 0.0:
                continue  # a switched-off term (e.g. before its warm-up ends) costs nothing
            allowed = self.term_kwargs.get(name)
            term_kw = kwargs if allowed is None else {k: v for k, v in kwargs.items() if k in allowed}
            value = call_loss(loss, input, target, **term_kw)
            terms[name] = value.detach()
            total = w * value if total is None else total + w * value
        self.last_terms = terms
        if total is None:
            return input.sum() * 0.0  # every weight is 0: a zero that still carries a graph
        return total
