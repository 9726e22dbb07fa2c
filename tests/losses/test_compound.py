"""CompoundLoss: weighted named terms, keyword routing, bundle-config construction, bad arguments."""

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from torch import nn

from segloss.losses import CompoundLoss, FocalLoss, WeightedCrossEntropyLoss
from segloss.losses.compound import call_loss


class Recorder(nn.Module):
    """A loss that records the keywords it got and returns mean(input) * scale."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.seen = None

    def forward(self, input, target, weight_map=None, skeleton=None):
        self.seen = {"weight_map": weight_map, "skeleton": skeleton}
        return input.mean() * self.scale


class PlainLoss(nn.Module):
    def forward(self, input, target):
        return input.square().mean()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), torch.randint(0, 3, (2, 1, 8, 8), generator=g)


def test_weighted_sum_value_gradient_and_last_terms():
    x, y = data()
    ce, focal = WeightedCrossEntropyLoss(), FocalLoss(to_onehot_y=True, use_softmax=True)
    loss = CompoundLoss({"ce": ce, "focal": focal}, weights={"ce": 0.5, "focal": 2.0})
    value = loss(x, y)
    expected = 0.5 * F.cross_entropy(x, y[:, 0]) + 2.0 * focal(x, y)
    torch.testing.assert_close(value, expected)
    (g,) = torch.autograd.grad(value, x)
    (g_ref,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g, g_ref)
    assert set(loss.last_terms) == {"ce", "focal"} and not loss.last_terms["ce"].requires_grad


def test_sequence_form_default_weights_and_set_weight():
    x, y = data(1)
    loss = CompoundLoss([WeightedCrossEntropyLoss(), PlainLoss()])
    assert list(loss.losses) == ["0", "1"] and loss.weights == {"0": 1.0, "1": 1.0}
    loss.set_weight("1", 0.0)
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y[:, 0]))
    assert "1" not in loss.last_terms  # a switched-off term is not evaluated
    loss.set_weight("0", 0.0)
    zero = loss(x, y)
    assert zero.item() == 0.0 and zero.requires_grad


def test_keywords_go_to_terms_that_accept_them_and_term_kwargs_restricts():
    x, y = data(2)
    w, s = torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long)
    a, b = Recorder(), Recorder()
    loss = CompoundLoss({"a": a, "b": b, "plain": PlainLoss()}, term_kwargs={"b": ["skeleton"], "plain": []})
    loss(x, y, weight_map=w, skeleton=s)  # PlainLoss takes neither keyword and must not receive them
    assert a.seen["weight_map"] is w and a.seen["skeleton"] is s
    assert b.seen["weight_map"] is None and b.seen["skeleton"] is s
    loss(x, y, skeleton=s)  # a keyword that is not a weight (an alternative target) skips the terms without it
    with pytest.raises(ValueError, match="term_kwargs"):
        CompoundLoss({"a": Recorder()}, term_kwargs={"z": []})


def test_no_keyword_is_dropped_without_a_word():
    x, y = data(5)
    s = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    # no term takes `skeleton`: the batch entry would be lost
    with pytest.raises(TypeError, match="no term of this CompoundLoss \\(ce, plain\\) takes `skeleton`"):
        CompoundLoss({"ce": WeightedCrossEntropyLoss(), "plain": PlainLoss()})(x, y, skeleton=s)
    # term_kwargs lists a keyword its term cannot take
    with pytest.raises(TypeError, match="PlainLoss.forward takes no `skeleton`"):
        CompoundLoss({"a": Recorder(), "plain": PlainLoss()}, term_kwargs={"plain": ["skeleton"]})(x, y, skeleton=s)
    # called on its own, a loss refuses any keyword its forward lacks
    with pytest.raises(TypeError, match="PlainLoss.forward takes no `skeleton`"):
        call_loss(PlainLoss(), x, y, skeleton=s)


def test_call_loss_passes_everything_to_var_keyword_forward():
    class Kw(nn.Module):
        def forward(self, input, target, **kwargs):
            return torch.tensor(float(len(kwargs)))

    assert call_loss(Kw(), torch.zeros(1), torch.zeros(1), a=1, b=2).item() == 2.0


def test_from_bundle_config():
    config = {
        "loss": {
            "_target_": "segloss.losses.CompoundLoss",
            "losses": {
                "ce": {"_target_": "segloss.losses.WeightedCrossEntropyLoss", "class_weight": [1.0, 2.0, 3.0]},
                "focal": {"_target_": "segloss.losses.FocalLoss", "to_onehot_y": True, "use_softmax": True},
            },
            "weights": {"ce": 1.0, "focal": 0.25},
        }
    }
    loss = ConfigParser(config).get_parsed_content("loss")
    x, y = data(3)
    expected = F.cross_entropy(x, y[:, 0], weight=torch.tensor([1.0, 2.0, 3.0])) + 0.25 * loss.losses["focal"](x, y)
    torch.testing.assert_close(loss(x, y), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"losses": {}}, ValueError, "at least one"),
        ({"losses": {"a": 3}}, TypeError, "losses\\['a'\\]"),
        ({"losses": [PlainLoss()], "weights": [1.0, 2.0]}, ValueError, "weights"),
        ({"losses": {"a": PlainLoss()}, "weights": {"b": 1.0}}, ValueError, "unknown"),
        ({"losses": {"a": PlainLoss()}, "weights": {"a": -1.0}}, ValueError, "weight of term 'a'"),
        ({"losses": {"a": PlainLoss()}, "weights": {"a": float("nan")}}, ValueError, "weight of term 'a'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompoundLoss(**kwargs)
    with pytest.raises(KeyError, match="no loss term"):
        CompoundLoss({"a": PlainLoss()}).set_weight("b", 1.0)


def test_weight_map_for_a_term_without_it_raises_naming_both():
    # the weight map would be dropped without a word: a Lovász loss has no weight_map
    from segloss.losses import LovaszSoftmaxLoss

    x, y = data(4)
    w = torch.rand(2, 1, 8, 8)
    loss = CompoundLoss({"ce": WeightedCrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()})
    with pytest.raises(TypeError, match="LovaszSoftmaxLoss.forward takes no `weight_map`"):
        loss(x, y, weight_map=w)
    with pytest.raises(TypeError, match="weight_map"):
        call_loss(PlainLoss(), x, y, weight_map=w)
    excluded = CompoundLoss(
        {"ce": WeightedCrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()}, term_kwargs={"lovasz": []}
    )
    expected = WeightedCrossEntropyLoss()(x, y, weight_map=w) + LovaszSoftmaxLoss()(x, y)
    torch.testing.assert_close(excluded(x, y, weight_map=w), expected)
