"""LossWeightScheduler on a tiny ignite Engine, built directly and from a MONAI bundle config."""

import pytest
import torch

ignite = pytest.importorskip("ignite")
from ignite.engine import Engine  # noqa: E402

from segloss.handlers import LossWeightScheduler  # noqa: E402
from segloss.losses import CompoundLoss, LovaszSoftmaxLoss, TermWeightSchedule, WeightedCrossEntropyLoss  # noqa: E402

POINTS = {"ce": [[1, 1.0], [3, 0.0]], "lovasz": [[1, 0.0], [3, 1.0]]}


def make_loss():
    return CompoundLoss({"ce": WeightedCrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()})


def run(loss, handler, epochs=4, iters=2):
    seen = []
    x, y = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 1, 6, 6))

    def step(engine, batch):
        value = loss(x, y)
        seen.append((engine.state.epoch, engine.state.iteration, dict(loss.weights), set(loss.last_terms)))
        return value.item()

    engine = Engine(step)
    handler.attach(engine)
    engine.run(range(iters), max_epochs=epochs)
    return seen


def test_by_epoch():
    loss = make_loss()
    seen = run(loss, LossWeightScheduler(loss, TermWeightSchedule(POINTS), by="epoch"))
    per_epoch = {epoch: w for epoch, _, w, _ in seen}
    assert per_epoch == {
        1: {"ce": 1.0, "lovasz": 0.0},  # epoch 1 is step 0
        2: {"ce": 1.0, "lovasz": 0.0},
        3: {"ce": 0.5, "lovasz": 0.5},
        4: {"ce": 0.0, "lovasz": 1.0},
    }
    assert seen[0][3] == {"ce"} and seen[-1][3] == {"lovasz"}  # zero-weight terms are skipped


def test_by_iteration_and_mapping_schedule():
    loss = make_loss()
    handler = LossWeightScheduler(loss, POINTS, by="iteration")
    seen = run(loss, handler, epochs=2, iters=2)
    assert [w["lovasz"] for _, _, w, _ in seen] == [0.0, 0.0, 0.5, 1.0]  # iterations 1..4 are steps 0..3
    assert handler.last_weights == {"ce": 0.0, "lovasz": 1.0}


def test_from_bundle_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "loss": {
                "_target_": "segloss.losses.CompoundLoss",
                "losses": {
                    "ce": {"_target_": "segloss.losses.WeightedCrossEntropyLoss"},
                    "lovasz": {"_target_": "segloss.losses.LovaszSoftmaxLoss", "per_image": True},
                },
            },
            "handler": {
                "_target_": "segloss.handlers.LossWeightScheduler",
                "loss": "@loss",
                "by": "epoch",
                "schedule": {"_target_": "segloss.losses.TermWeightSchedule", "points": POINTS, "mode": "step"},
            },
        }
    )
    loss, handler = parser.get_parsed_content("loss"), parser.get_parsed_content("handler")
    assert handler.loss is loss
    seen = run(loss, handler, epochs=4, iters=1)
    assert [w["ce"] for _, _, w, _ in seen] == [1.0, 1.0, 1.0, 0.0]


def test_bad_arguments():
    loss = make_loss()
    with pytest.raises(ValueError, match="by"):
        LossWeightScheduler(loss, POINTS, by="batch")
    with pytest.raises(ValueError, match="schedule"):
        LossWeightScheduler(loss, {"dice": [[0, 1.0]]})
    with pytest.raises(TypeError, match="loss"):
        LossWeightScheduler(torch.nn.MSELoss(), POINTS)
