"""segloss.engines.LossKwargsIteration: each batch's weight map reaches the loss in MONAI's SupervisedTrainer."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from segloss.engines import LossKwargsIteration
from segloss.losses import CompoundLoss, WeightedCrossEntropyLoss


class RecordingLoss(nn.Module):
    """Mean of weight_map * (input - target)^2, recording every weight map it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor | None] = []

    def forward(self, input, target, weight_map=None):
        self.seen.append(None if weight_map is None else weight_map.detach().clone())
        w = torch.ones_like(input) if weight_map is None else weight_map
        return (w * (input - target) ** 2).mean()


def _batches(n=3, shape=(2, 1, 4, 5)):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.rand(shape, generator=g),
            "label": torch.rand(shape, generator=g),
            "weight_map": torch.rand(shape, generator=g) * 5 + i,
        }
        for i in range(n)
    ]


def _trainer(loss, batches, **kwargs):
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=loss,
        decollate=False,
        **kwargs,
    )


def test_loss_receives_each_batch_weight_map_and_trains_like_a_manual_loop():
    batches = _batches()
    loss = RecordingLoss()
    trainer = _trainer(loss, batches, iteration_update=LossKwargsIteration())
    losses = []
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert len(loss.seen) == len(batches)
    for seen, batch in zip(loss.seen, batches):
        torch.testing.assert_close(seen, batch["weight_map"], rtol=0, atol=0)
    assert trainer.loss_function is loss, "the configured loss is restored after each step"

    # the same steps by hand: the trainer did exactly weighted SGD
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref = RecordingLoss()
    expected = []
    for batch in batches:
        opt.zero_grad()
        value = ref(net(batch["image"]), batch["label"], weight_map=batch["weight_map"])
        value.backward()
        opt.step()
        expected.append(value.item())
    assert losses == pytest.approx(expected, rel=1e-6)
    for p, q in zip(trainer.network.parameters(), net.parameters()):
        torch.testing.assert_close(p, q)


def test_without_iteration_update_monai_passes_no_weight_map():
    """The gap this module fills: MONAI alone calls loss(pred, label)."""
    loss = RecordingLoss()
    _trainer(loss, _batches(1)).run()
    assert loss.seen == [None]


def test_compound_loss_weight_map_reaches_weighted_ce():
    shape = (2, 1, 6, 6)
    g = torch.Generator().manual_seed(3)
    batch = {
        "image": torch.rand(shape, generator=g),
        "label": (torch.rand(shape, generator=g) > 0.5).float(),
        "weight_map": torch.rand(shape, generator=g) * 10,
    }
    loss = CompoundLoss({"ce": WeightedCrossEntropyLoss()})
    torch.manual_seed(0)
    net = nn.Conv2d(1, 2, 3, padding=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=loss,
        iteration_update=LossKwargsIteration(),
        decollate=False,
    )
    trainer.run()
    with torch.no_grad():
        logits = net(batch["image"])
    logp = torch.log_softmax(logits.double(), 1).gather(1, batch["label"].long())
    w = batch["weight_map"].double()
    expected = -(w * logp).sum() / w.sum()
    assert trainer.state.output["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    unweighted = -logp.mean()
    assert abs(expected.item() - unweighted.item()) > 1e-3, "the weight map changes the value"


def test_missing_key_raises_and_restores_loss():
    loss = RecordingLoss()
    batch = _batches(1)[0]
    del batch["weight_map"]
    trainer = _trainer(loss, [batch], iteration_update=LossKwargsIteration())
    with pytest.raises(KeyError, match="weight_map"):
        trainer.run()
    assert trainer.loss_function is loss
    trainer = _trainer(loss, [batch], iteration_update=LossKwargsIteration(allow_missing_keys=True))
    trainer.run()
    assert loss.seen == [None]


def test_custom_keys_and_losses_without_the_keyword():
    batches = _batches(2)
    loss = RecordingLoss()
    _trainer(loss, batches, iteration_update=LossKwargsIteration({"weight_map": "image"})).run()
    for seen, batch in zip(loss.seen, batches):
        torch.testing.assert_close(seen, batch["image"], rtol=0, atol=0)
    # a loss whose forward has no weight_map (plain MONAI) raises rather than train unweighted
    with pytest.raises(TypeError, match="MSELoss.forward takes no `weight_map`"):
        _trainer(nn.MSELoss(), batches, iteration_update=LossKwargsIteration()).run()
    # so does any other routed keyword (an alternative target): no batch entry is dropped without a word
    with pytest.raises(TypeError, match="MSELoss.forward takes no `skeleton`"):
        _trainer(nn.MSELoss(), batches, iteration_update=LossKwargsIteration({"skeleton": "weight_map"})).run()
    with pytest.raises(ValueError, match="keys"):
        LossKwargsIteration({})


def test_keys_as_a_list_of_names():
    assert LossKwargsIteration(["weight_map", "skeleton"]).keys == {"weight_map": "weight_map", "skeleton": "skeleton"}
    assert LossKwargsIteration("weight_map").keys == {"weight_map": "weight_map"}
    with pytest.raises(ValueError, match="keys"):
        LossKwargsIteration([])


def test_loss_batch_keys_reads_the_term_kwargs_of_nested_compound_losses():
    from segloss.engines import loss_batch_keys
    from segloss.losses import DiceLoss, SkeletonRecallLoss, TopologyAwareLoss

    dice = DiceLoss(to_onehot_y=True, softmax=True)
    border = CompoundLoss({"ce": WeightedCrossEntropyLoss(), "dice": dice}, term_kwargs={"ce": ["weight_map"]})
    assert loss_batch_keys(border) == ["weight_map"]
    recall = CompoundLoss(
        {"dice": dice, "recall": SkeletonRecallLoss(softmax=True)}, term_kwargs={"recall": ["skeleton"]}
    )
    both = CompoundLoss({"border": border, "recall": recall})
    assert loss_batch_keys(both) == ["skeleton", "weight_map"]
    # TopologyAwareLoss is a CompoundLoss whose own term_kwargs keep the topology term empty
    assert loss_batch_keys(TopologyAwareLoss(pixel_loss=border, topology_loss=RecordingLoss())) == ["weight_map"]
    assert loss_batch_keys(CompoundLoss({"dice": dice})) == []  # every term gets what it takes, nothing is named
    assert loss_batch_keys(dice) == []
    assert loss_batch_keys(lambda input, target: input.sum()) == []  # a plain callable loss
