"""segloss metrics inside a MONAI SupervisedEvaluator via monai.handlers.IgniteMetricHandler (no wrapper needed)."""

import pytest
import torch

pytest.importorskip("ignite")

from metric_shapes import CUT_RING, RING, TWO_DISCS, onehot  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.engines import SupervisedEvaluator  # noqa: E402

from segloss.metrics import cldice  # noqa: E402


def test_supervised_evaluator_with_topology_metrics():
    # as in a bundle's validate section: metric_fn referenced by _target_, decollated pred/label from the engine
    handler = {
        "_target_": "IgniteMetricHandler",
        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
    }
    config = {
        "key": {**handler, "metric_fn": {"_target_": "segloss.metrics.ClDiceMetric"}},
        "betti": {**handler, "metric_fn": {"_target_": "segloss.metrics.BettiNumberError"}},
        "betti_k": {**handler, "metric_fn": {"_target_": "segloss.metrics.BettiNumberError", "per_dimension": True}},
        "delineation": {**handler, "metric_fn": {"_target_": "segloss.metrics.DelineationMetric"}},
    }
    parser = ConfigParser(config)
    batches = [  # identity network: "image" is the binarised one-hot prediction
        {"image": onehot(RING), "label": onehot(CUT_RING)},
        {"image": onehot(TWO_DISCS), "label": onehot(TWO_DISCS)},
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=batches,
        epoch_length=2,
        network=torch.nn.Identity(),
        key_val_metric={"val_cldice": parser.get_parsed_content("key")},
        additional_metrics={
            "val_betti": parser.get_parsed_content("betti"),
            "val_betti_k": parser.get_parsed_content("betti_k"),
            "val_delineation": parser.get_parsed_content("delineation"),
        },
    )
    evaluator.run()
    metrics = evaluator.state.metrics
    expected_cldice = (cldice(RING, CUT_RING) + 1.0) / 2
    assert metrics["val_cldice"] == pytest.approx(expected_cldice, rel=1e-6)
    assert evaluator.state.best_metric == pytest.approx(expected_cldice, rel=1e-6)  # scalar key metric compares
    assert metrics["val_betti"] == 0.5  # ring vs cut ring: |beta1| error 1; identical discs: 0
    assert metrics["val_betti_k"].tolist() == [0.0, 0.5]  # vector metrics work as additional metrics
    assert metrics["val_delineation"].shape == (3,)
    details = evaluator.state.metric_details
    assert details["val_cldice"].shape == (2, 1) and details["val_betti_k"].shape == (2, 1, 2)
