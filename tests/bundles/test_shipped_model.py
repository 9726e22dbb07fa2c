"""The shipped ``models/model.pt`` of each bundle: inference, evaluation, export and in/out check with no training.

Each bundle ships a model trained by the CPU recipe of its README ("Shipped model"); without the file (e.g. a
checkout that dropped it) these tests skip, saying which command makes it.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, run, workflow
from PIL import Image

BUNDLE_NAMES = ["em_membrane_2d", "ct_spleen_3d"]
SAMPLE = {"em_membrane_2d": "isbi2012_em", "ct_spleen_3d": "msd_spleen_smoketest"}
pytestmark = pytest.mark.slow


def shipped_model(bundle: str):
    path = BUNDLES / bundle / "models" / "model.pt"
    if not path.is_file():
        pytest.skip(
            f"no shipped model at bundles/{bundle}/models/model.pt: train it with the command under "
            f"'Shipped model' in bundles/{bundle}/docs/README.md"
        )
    return path


def _network(bundle: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_shipped_model_is_a_plain_state_dict_of_the_bundle_network(bundle):
    state = torch.load(shipped_model(bundle), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    _network(bundle).load_state_dict(state, strict=True)  # every key and shape matches network_def


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_inference_json_on_a_sample_case_writes_a_segmentation(bundle, shared_data, tmp_path):
    """`inference.json` as shipped (its own ckpt_path) on one sample EM section / CT volume."""
    shipped_model(bundle)
    sample = shared_data(SAMPLE[bundle])
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    if bundle == "em_membrane_2d":
        shutil.copy(sample / "images" / "24.png", input_dir / "24.png")  # a validation section
    else:
        shutil.copy(sample / "imagesTr" / "spleen_8.nii.gz", input_dir / "spleen_8.nii.gz")
    out = tmp_path / "out"
    run(workflow(bundle, ("inference.json",), input_dir=str(input_dir), output_dir=str(out), num_workers=0))
    if bundle == "em_membrane_2d":
        pred = np.asarray(Image.open(out / "24_membrane.png"))
        label = np.asarray(Image.open(sample / "labels" / "24.png")) == 0  # 0 = membrane on disk
        assert pred.shape == label.shape and set(np.unique(pred)) <= {0, 255}
        membrane = pred == 255
        dice = 2 * (membrane & label).sum() / (membrane.sum() + label.sum())
        assert dice > 0.5, f"the shipped model segments membranes (Dice {dice:.3f} on section 24)"
    else:
        pred = nib.load(out / "spleen_8_seg.nii.gz")
        assert pred.shape == nib.load(input_dir / "spleen_8.nii.gz").shape
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def _metrics(path) -> dict[str, float]:
    rows = [line.split(",") for line in path.read_text().splitlines() if line.strip()]
    return {name: float(value) for name, value in rows}


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_evaluate_json_reports_the_shipped_model_metrics(bundle, shared_data, tmp_path, capfd, caplog):
    shipped_model(bundle)
    sample = shared_data(SAMPLE[bundle])
    caplog.set_level("INFO")
    run(
        workflow(
            bundle,
            ("train.json", "evaluate.json"),
            dataset_dir=str(sample),
            output_dir=str(tmp_path / "eval"),
            ckpt_dir=str(BUNDLES / bundle / "models"),
            num_workers=0,
        )
    )
    metrics = _metrics(tmp_path / "eval" / "metrics.csv")
    printed = capfd.readouterr().out + caplog.text  # StatsHandler's own stream handler, or the log records
    assert all(f"{name}: " in printed for name in metrics), "the metrics are printed"
    if bundle == "em_membrane_2d":
        assert set(metrics) == {"val_mean_dice", "val_cldice", "val_betti_error"}
        assert metrics["val_mean_dice"] > 0.5 and metrics["val_cldice"] > 0.5, metrics
    else:
        assert 0.0 <= metrics["val_mean_dice"] <= 1.0


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_ckpt_export_of_the_shipped_model(bundle, tmp_path):
    from monai.bundle import ckpt_export

    model = shipped_model(bundle)
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(model),
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        config_file=str(BUNDLES / bundle / "configs" / "inference.json"),
        bundle_root=str(BUNDLES / bundle),
    )
    net = _network(bundle)
    net.load_state_dict(torch.load(model, weights_only=True))
    x = torch.rand(1, 1, *((64, 64) if bundle == "em_membrane_2d" else (32, 32, 32)))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts")).eval()(x), net.eval()(x))
