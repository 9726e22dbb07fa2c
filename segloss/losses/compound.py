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


# Keywords that weigh the loss: a term that cannot take one would silently mean something else, so it raises.
# Other keywords (an alternative target such as ``skeleton``) reach only the terms that take them.
WEIGHTING_KEYWORDS = frozenset({"weight_map"})


def call_loss(loss: nn.Module, input: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """Call ``loss(input, target, **kwargs)``, refusing a keyword that its ``forward`` does not take.

    Raises:
        TypeError: naming the keywords and the loss when ``forward`` takes neither them nor ``**kwargs`` (e.g. a
            ``weight_map`` for a Lovász loss or a plain MONAI loss): the batch entry would be dropped without a
            word. Route it only to losses that take it (``LossKwargsIteration(keys=...)``, or a
            :class:`CompoundLoss` with ``term_kwargs``).
    """
    if kwargs:
        accepted = _accepted_kwargs(loss)
        refused = [] if accepted is None else sorted(set(kwargs) - accepted)
        if refused:
            raise TypeError(
                f"{type(loss).__name__}.forward takes no {', '.join(f'`{k}`' for k in refused)}, so it would be "
                "dropped. Do not pass it to this loss, or in a CompoundLoss leave it out of this term's "
                "`term_kwargs` (e.g. term_kwargs={'<term>': []})."
            )
    return loss(input, target, **kwargs)


class CompoundLoss(nn.Module):
    r"""Weighted sum of named loss terms: ``sum_k weights[k] * losses[k](input, target)``.

    .. math::

        \mathcal{L}(x, y) = \sum_{k \,:\, \lambda_k > 0} \lambda_k \, \mathcal{L}_k(x, y, \text{kwargs}_k)

    with ``lambda_k`` = ``weights[k]`` and ``kwargs_k`` the ``forward`` keywords routed to term ``k`` (below); a
    term of weight 0 is not called, and with every weight 0 the loss is a zero that keeps the graph.

    Any callable ``nn.Module`` loss works as a term (segloss or MONAI). Keyword arguments of ``forward`` (e.g.
    ``weight_map``, ``skeleton``) go to the terms whose ``forward`` takes them, or, for a term named in
    ``term_kwargs``, to it only when listed there (e.g. keep the border weight map away from a Dice term). No
    keyword is dropped without a word: ``TypeError`` names it when ``weight_map`` reaches a term that does not take
    it (it would be left unweighted; leave it out with ``term_kwargs``), when ``term_kwargs`` lists a keyword its
    term does not take, or when no term takes a keyword at all.
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
            none); terms not named receive every keyword their ``forward`` takes, and ``weight_map`` (see above).

    Example:
        Cross-entropy plus half a Dice term; the border weight map reaches the cross-entropy only:

        >>> import monai
        >>> import torch.nn.functional as F
        >>> from segloss.losses import CompoundLoss, DiceLoss, WeightedCrossEntropyLoss
        >>> _ = torch.manual_seed(0)
        >>> logits, label, w = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8)), torch.rand(2, 1, 8, 8)
        >>> terms = {"ce": WeightedCrossEntropyLoss(), "dice": DiceLoss(to_onehot_y=True, softmax=True)}
        >>> loss = CompoundLoss(terms, weights={"ce": 1.0, "dice": 0.5}, term_kwargs={"dice": []})
        >>> ce = (w[:, 0] * F.cross_entropy(logits, label[:, 0], reduction="none")).sum() / w.sum()
        >>> dice = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)(logits, label)
        >>> torch.allclose(loss(logits, label, weight_map=w), ce + 0.5 * dice), sorted(loss.last_terms)
        (True, ['ce', 'dice'])
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

    def _routed(self, name: str, keys) -> set[str]:
        """The keywords among ``keys`` that term ``name`` receives (``call_loss`` then refuses what it cannot take)."""
        allowed = self.term_kwargs.get(name)
        if allowed is not None:
            return set(keys) & allowed
        accepted = _accepted_kwargs(self.losses[name])
        return set(keys) if accepted is None else set(keys) & (accepted | WEIGHTING_KEYWORDS)

    def forward(self, input: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        routed = {name: self._routed(name, kwargs) for name in self.losses}
        unused = set(kwargs).difference(*routed.values())
        if unused:
            raise TypeError(
                f"no term of this CompoundLoss ({', '.join(self.losses)}) takes "
                f"{', '.join(f'`{k}`' for k in sorted(unused))}: do not pass it, or add a term that uses it."
            )
        total = None
        terms = {}
        for name, loss in self.losses.items():
            w = self.weights[name]
            if w == 0.0:
                continue  # a switched-off term (e.g. before its warm-up ends) costs nothing
            value = call_loss(loss, input, target, **{k: kwargs[k] for k in routed[name]})
            terms[name] = value.detach()
            total = w * value if total is None else total + w * value
        self.last_terms = terms
        if total is None:
            return input.sum() * 0.0  # every weight is 0: a zero that still carries a graph
        return total
