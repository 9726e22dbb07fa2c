"""End-to-end tests of the MONAI bundles on CPU: train, evaluate, infer, export, resume, failure modes.

Each run uses a tiny budget (2 iterations per epoch, small patches and networks) on the synthetic fallback data,
and on the shared sample data when present.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import BUNDLES, SYNTHETIC_DIR, TINY, cli_args, run, run_cli, synthetic, tiny, workflow
from ignite.engine import Events
from PIL import Image

from segloss.data import write_ct_3d, write_membrane_2d

BUNDLE_NAMES = ["em_membrane_2d", "ct_spleen_3d"]
pytestmark = pytest.mark.slow


def _saved_epoch(path) -> int:
    state = torch.load(path, weights_only=True)["trainer"]  # ignite keeps the iteration; epochs are whole
    return state["iteration"] // state["epoch_length"]


def _epochs_run(wf, loss_weights: dict | None = None) -> list[int]:
    """Initialise ``wf``, record the epochs its trainer runs (and the loss term weights used in each), run it."""
    wf.initialize()
    epochs = []
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs.append(engine.state.epoch))
    if loss_weights is not None:
        loss = wf.parser.get_parsed_content("loss")
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: loss_weights.__setitem__(e.state.epoch, dict(getattr(loss, "weights", {}))),  # compound losses
        )
    wf.run()
    wf.finalize()
    return epochs


@pytest.fixture(scope="module", params=BUNDLE_NAMES)
def trained(request, tmp_path_factory):
    """A 2-epoch synthetic training run of each bundle: (bundle, work folder, loss term weights per epoch)."""
    bundle, work = request.param, tmp_path_factory.mktemp(request.param)
    weights = {}
    staged = {"loss": "@loss_options#dice_ce_then_lovasz"} if bundle == "ct_spleen_3d" else {}  # a stage switch
    wf = workflow(bundle, max_epochs=2, **staged, **synthetic(work), **tiny(bundle, work))
    assert _epochs_run(wf, weights) == [1, 2]
    return bundle, work, weights


def test_default_loss_is_segloss_and_ct_second_stage_starts(trained):
    from monai.bundle import ConfigParser

    bundle, _, weights = trained
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    default = parser[parser["loss"].removeprefix("@")]
    assert default["_target_"].startswith("segloss.losses.")
    if bundle == "ct_spleen_3d":  # dice_ce_then_lovasz: DiceCE alone in epoch 1, Lovasz joins at second_stage_epoch 2
        assert weights == {1: {"dice_ce": 1.0, "lovasz": 0.0}, 2: {"dice_ce": 1.0, "lovasz": 1.0}}


def test_train_writes_best_and_resumable_checkpoints(trained):
    bundle, work, _ = trained
    assert (work / "eval" / SYNTHETIC_DIR[bundle]).is_dir(), "the synthetic fallback was used"
    best = torch.load(work / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values()), "model.pt is a plain state dict"
    last = torch.load(work / "models" / "last.pt", weights_only=True)
    assert set(last) == {"model", "optimizer", "trainer", "best"}
    assert last["trainer"]["iteration"] == 4 and last["trainer"]["epoch_length"] == 2, "saved after epoch 2"
    assert not [p.name for p in (work / "models").iterdir() if p.name not in ("model.pt", "last.pt")], (
        "no temporary checkpoint files are left behind"
    )


def test_evaluate_writes_metrics(trained):
    bundle, work, _ = trained
    run(workflow(bundle, ("train.json", "evaluate.json"), **synthetic(work), **tiny(bundle, work)))
    with open(work / "eval" / "val_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0.0 <= float(r["mean"]) <= 1.0 for r in rows)
    assert "val_mean_dice" in (work / "eval" / "metrics.csv").read_text()


def _inference_input(bundle, root):
    """A small input folder whose geometry the output must reproduce."""
    if bundle == "em_membrane_2d":
        write_membrane_2d(root, num=2, size=(64, 96))
        return root / "images"
    write_ct_3d(root, num=1, size=(40, 36, 24), spacing=(2.0, 2.5, 3.0))
    return root / "imagesTr"


def test_inference_keeps_input_geometry(trained, tmp_path):
    bundle, work, _ = trained
    input_dir = _inference_input(bundle, tmp_path / "input")
    out = tmp_path / "out"
    overrides = {k: v for k, v in tiny(bundle, work).items() if k in ("patch_size", "spacing", "network_def#channels")}
    run(
        workflow(
            bundle,
            ("inference.json",),
            input_dir=str(input_dir),
            output_dir=str(out),
            ckpt_path=str(work / "models" / "model.pt"),
            num_workers=0,
            **overrides,
        )
    )
    if bundle == "em_membrane_2d":
        for name in ("00", "01"):
            pred = np.asarray(Image.open(out / f"{name}_membrane.png"))
            assert pred.shape == (64, 96) and set(np.unique(pred)) <= {0, 255}
    else:
        pred, image = nib.load(out / "case_000_seg.nii.gz"), nib.load(input_dir / "case_000.nii.gz")
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_ckpt_export_torchscript_matches_checkpoint(trained, tmp_path):
    from monai.bundle import ConfigParser, ckpt_export

    bundle, work, _ = trained
    channels = tiny(bundle, work).get("network_def#channels")
    extra = {"network_def#channels": channels} if channels else {}
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(work / "models" / "model.pt"),
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        config_file=str(BUNDLES / bundle / "configs" / "inference.json"),
        bundle_root=str(BUNDLES / bundle),
        **extra,
    )
    parser = ConfigParser()
    parser.read_config(BUNDLES / bundle / "configs" / "inference.json")
    parser.update(extra)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(work / "models" / "model.pt", weights_only=True))
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 1, *tiny(bundle, work)["patch_size"])
    with torch.no_grad():
        torch.testing.assert_close(ts.eval()(x), net.eval()(x))
    extra_files = {"metadata.json": ""}
    torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 2


def test_resume_continues_from_last_epoch(trained, tmp_path):
    bundle, work, _ = trained
    shutil.copytree(work / "models", tmp_path / "models")
    shutil.copytree(work / "eval" / SYNTHETIC_DIR[bundle], tmp_path / "eval" / SYNTHETIC_DIR[bundle])
    before = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    wf = workflow(bundle, max_epochs=3, **synthetic(tmp_path), **tiny(bundle, tmp_path))
    assert _epochs_run(wf) == [3], "only the missing epoch runs"
    after = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert after["trainer"]["iteration"] == 6
    assert after["best"] == before["best"] or after["best"]["_saved"], "the best-model record is carried over"
    # and resume=False starts from scratch
    wf = workflow(bundle, max_epochs=1, resume=False, **synthetic(tmp_path), **tiny(bundle, tmp_path))
    assert _epochs_run(wf) == [1]


def test_killed_run_loses_at_most_one_epoch(tmp_path):
    """Kill a CLI training run mid-way; last.pt is intact and training resumes after its epoch."""
    import os
    import signal
    import subprocess

    from bundle_utils import subprocess_env

    bundle = "em_membrane_2d"
    overrides = tiny(bundle, tmp_path, max_epochs=1000, **synthetic(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *cli_args(overrides)],
        cwd=BUNDLES / bundle,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "models" / "last.pt"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and _saved_epoch(last) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run was still going when killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    saved = _saved_epoch(last)
    assert saved >= 2
    wf = workflow(bundle, max_epochs=saved + 1, **synthetic(tmp_path), **tiny(bundle, tmp_path))
    assert _epochs_run(wf) == [saved + 1]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_unknown_loss_target_fails_before_training(bundle, tmp_path):
    wf = workflow(
        bundle,
        loss={"_target_": "segloss.losses.NoSuchLoss"},
        **synthetic(tmp_path),
        **tiny(bundle, tmp_path),
    )
    with pytest.raises(Exception) as err:
        wf.initialize()
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("NoSuchLoss" in msg for msg in chain)
    assert not (tmp_path / "eval").exists(), "no data was prepared before the failure"


def _small_dataset(bundle, root):
    if bundle == "em_membrane_2d":
        write_membrane_2d(root, num=30, size=64)
        return root / "labels" / "25.png", root / "images" / "03.png"
    write_ct_3d(root, num=3, size=32)
    return root / "labelsTr" / "case_002.nii.gz", root / "imagesTr" / "case_001.nii.gz"


def _error_chain(excinfo) -> str:
    out, e = [], excinfo.value
    while e is not None:
        out.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(out)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_missing_file_error_names_it(bundle, tmp_path):
    missing, _ = _small_dataset(bundle, tmp_path / "data")
    missing.unlink()
    wf = workflow(bundle, max_epochs=1, dataset_dir=str(tmp_path / "data"), **tiny(bundle, tmp_path))
    with pytest.raises(Exception) as err:
        run(wf)
    assert str(missing) in _error_chain(err)
    assert not (tmp_path / "models").exists(), "nothing was trained"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_corrupt_file_error_names_it(bundle, tmp_path):
    _, corrupt = _small_dataset(bundle, tmp_path / "data")
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])  # truncated: a PNG without its end, a .nii.gz cut mid-stream
    wf = workflow(bundle, max_epochs=1, dataset_dir=str(tmp_path / "data"), **tiny(bundle, tmp_path))
    with pytest.raises(Exception) as err:
        run(wf)
    assert str(corrupt) in _error_chain(err)


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_multi_gpu_train_under_torchrun_on_cpu(bundle, tmp_path):
    overrides = tiny(bundle, tmp_path, max_epochs=1, **synthetic(tmp_path))
    result = run_cli(
        bundle,
        ["--config_file", "['configs/train.json','configs/multi_gpu_train.json']", *cli_args(overrides)],
        launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "last.pt").is_file()
    last = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert _saved_epoch(tmp_path / "models" / "last.pt") == 1
    assert not any(k.startswith("module.") for k in last["model"]), "the DDP wrapper is not saved"


SHARED = {
    "em_membrane_2d": [("isbi2012_em", {"val_sections": "24"})],
    "ct_spleen_3d": [
        ("msd_spleen_smoketest", {"spacing": [4.0, 4.0, 4.0]}),
        ("totalseg_examples_ct", {"spacing": [4.0, 4.0, 4.0], "cases": ["ts_abdomen_3mm", "ts_dicom_20slices"]}),
    ],
}


@pytest.mark.parametrize(
    "bundle,name,extra", [(b, n, e) for b, sets in SHARED.items() for n, e in sets], ids=lambda v: str(v)[:24]
)
def test_train_on_shared_sample_data(bundle, name, extra, shared_data, tmp_path):
    root = shared_data(name)
    wf = workflow(bundle, max_epochs=1, dataset_dir=str(root), **{**tiny(bundle, tmp_path), **extra})
    assert _epochs_run(wf) == [1]
    assert not (tmp_path / "eval" / SYNTHETIC_DIR[bundle]).exists(), "the real data was used"
    assert (tmp_path / "models" / "model.pt").is_file()


def _run_recording_loss_kwarg(wf, term_of, key: str):
    """Run ``wf`` recording what the loss term ``term_of(loss)`` receives as keyword ``key`` and each batch:
    ``(received values, batches)``."""
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    term = term_of(wf.parser.get_parsed_content("loss"))
    received, batches = [], []
    forward = term.forward

    def recording_forward(input, target, **kwargs):
        received.append(kwargs[key])
        return forward(input, target, **kwargs)

    term.forward = recording_forward
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: batches.append(dict(e.state.batch)))
    wf.run()
    wf.finalize()
    return received, batches


def test_em_border_weight_map_reaches_the_weighted_ce_term(tmp_path):
    """Each batch's weight_map (BorderWeightMapd, cropped with the image) is what the CE term receives, with the
    default loss_batch_keys: the option's term_kwargs name it."""
    wf = workflow(
        "em_membrane_2d",
        loss="@loss_options#border_ce_dice_topology",  # the default (Dice) takes no weight map
        max_epochs=1,
        epoch_length=2,
        val_interval=10,
        **synthetic(tmp_path),
        **{k: v for k, v in tiny("em_membrane_2d", tmp_path).items() if k not in ("epoch_length", "val_interval")},
    )
    received, batches = _run_recording_loss_kwarg(wf, lambda loss: loss.losses["pixel"].losses["ce"], "weight_map")
    assert len(received) == len(batches) == 2
    for got, batch in zip(received, batches):
        torch.testing.assert_close(got.as_tensor().cpu(), batch["weight_map"].as_tensor(), rtol=0, atol=0)
        assert got.max() > 2.0, "border weights (w0 = 10) are present, not a map of ones"


def test_ct_skeleton_reaches_the_skeleton_recall_term(tmp_path):
    """Choosing the skeleton-recall option is enough (the default loss_batch_keys read ['skeleton'] from its
    term_kwargs): the CT bundle skeletonises each cached label (Skeletonized), crops the skeleton with the image,
    and the skeleton-recall term receives exactly the batch's skeleton."""
    wf = workflow(
        "ct_spleen_3d",
        loss="@loss_options#dice_ce_skeleton_recall",
        max_epochs=1,
        **synthetic(tmp_path),
        **tiny("ct_spleen_3d", tmp_path),
    )
    received, batches = _run_recording_loss_kwarg(wf, lambda loss: loss.losses["skeleton_recall"], "skeleton")
    assert len(received) == len(batches) > 0
    for got, batch in zip(received, batches):
        torch.testing.assert_close(got.as_tensor().cpu(), batch["skeleton"].as_tensor(), rtol=0, atol=0)
        assert 0 < batch["skeleton"].sum() < batch["label"].sum(), "a thin skeleton of the label, not the label itself"


@pytest.mark.parametrize(
    "bundle, option, keys",
    [
        ("em_membrane_2d", None, []),
        ("em_membrane_2d", "ce", []),
        ("em_membrane_2d", "border_ce_dice", ["weight_map"]),
        ("em_membrane_2d", "border_ce_dice_topology", ["weight_map"]),
        ("em_membrane_2d", "skeleton_recall", ["skeleton"]),
        ("ct_spleen_3d", None, []),
        ("ct_spleen_3d", "dice_ce_skeleton_recall", ["skeleton"]),
    ],
)
def test_default_loss_batch_keys_follow_the_chosen_loss(bundle, option, keys, tmp_path, monkeypatch):
    """A loss option that needs a batch entry gets it without --loss_batch_keys; an explicit value overrides."""
    from monai.bundle import ConfigParser

    monkeypatch.setenv("SEGLOSS_VGG19_WEIGHTS", str(tmp_path / "no_such_vgg19.pth"))  # no download attempt
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    if option is not None:
        parser["loss"] = f"@loss_options#{option}"
    assert parser.get_parsed_content("loss_batch_keys") == keys
    parser["loss_batch_keys"] = []
    parser.parse()
    assert parser.get_parsed_content("loss_batch_keys") == []


def test_ct_default_loss_makes_no_skeleton():
    """Without the skeleton key no skeleton is computed (a 3D skeleton of every cached CT label costs time for nothing)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "ct_spleen_3d" / "configs" / "train.json"))
    assert parser.get_parsed_content("train#skeleton_transforms") == []
    parser["loss_batch_keys"] = ["skeleton"]
    parser.parse()
    (skeletonize,) = parser.get_parsed_content("train#skeleton_transforms")
    assert type(skeletonize).__name__ == "Skeletonized"


@pytest.mark.parametrize(
    "bundle, option", [("em_membrane_2d", "border_ce_dice_topology"), ("ct_spleen_3d", "dice_ce_topology")]
)
def test_topology_weights_auto_offline_is_the_shipped_prior_and_none_is_random_vgg(
    bundle, option, tmp_path, monkeypatch
):
    """No ImageNet VGG-19 on disk: topology_weights='auto' builds MaskFeatures (2D, and its 3D twin), None random VGG-19."""
    from monai.bundle import ConfigParser

    from segloss.networks import MaskFeatures, VGG19Features

    monkeypatch.setenv("SEGLOSS_VGG19_WEIGHTS", str(tmp_path / "no_such_vgg19.pth"))  # no download attempt
    for weights, extractor in (("auto", MaskFeatures), (None, VGG19Features)):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
        parser["topology_weights"] = weights
        topology = parser.get_parsed_content(f"loss_options#{option}").losses["topology"]
        assert isinstance(topology.feature_extractor, extractor)
        assert (topology.volume_extractor is not None) == (weights == "auto")


def test_em_batch_key_the_loss_cannot_take_stops_the_first_step(tmp_path):
    """loss_batch_keys routes the skeleton to the default Dice loss, which has no such keyword: TypeError, not a drop."""
    wf = workflow(
        "em_membrane_2d",
        loss_batch_keys=["skeleton"],
        max_epochs=1,
        **synthetic(tmp_path),
        **tiny("em_membrane_2d", tmp_path),
    )
    with pytest.raises(Exception) as err:
        wf.run()
    assert "DiceLoss.forward takes no `skeleton`" in _error_chain(err)


def test_topology_weights_imagenet_fails_clearly_without_weights(tmp_path, monkeypatch):
    """topology_weights='imagenet' with no weights available stops before any data is read, naming the options."""
    monkeypatch.setenv("SEGLOSS_VGG19_WEIGHTS", str(tmp_path / "no_such_vgg19.pth"))  # no download attempt
    wf = workflow(
        "em_membrane_2d",
        loss="@loss_options#border_ce_dice_topology",
        topology_weights="imagenet",
        **synthetic(tmp_path),
        **tiny("em_membrane_2d", tmp_path),
    )
    with pytest.raises(Exception) as err:
        wf.initialize()
    assert "WeightsNotFoundError" in _error_chain(err) and "SEGLOSS_VGG19_WEIGHTS" in _error_chain(err)
    assert not (tmp_path / "eval").exists()


def test_quick_main_job_prints_metrics_and_writes_figure(tmp_path, capsys):
    """The README's main job (train.json + quick.json) on a tiny budget: metrics printed, figure + logs written."""
    out = tmp_path / "quick"
    small = {k: v for k, v in TINY["em_membrane_2d"].items() if k not in ("epoch_length", "val_interval")}
    wf = workflow(
        "em_membrane_2d",
        ("train.json", "quick.json"),
        max_epochs=2,
        epoch_length=2,
        val_interval=1,
        **synthetic(tmp_path),
        output_dir=str(out),
        **small,
    )
    run(wf)
    printed = capsys.readouterr().out
    for name in ("val_mean_dice", "val_cldice", "val_betti_error", "s/iteration"):
        assert name in printed
    assert "data: " in printed and SYNTHETIC_DIR["em_membrane_2d"] in printed, "the run says which data it used"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["seconds_per_iteration"] > 0
    assert set(summary["validation"]) == {"val_mean_dice", "val_cldice", "val_betti_error"}
    image = np.asarray(Image.open(out / "training.png"))
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard logs"
    assert (out / "models" / "model.pt").is_file()


HELPER = {"em_membrane_2d": "download_isbi2012", "ct_spleen_3d": "download_msd_spleen"}


def test_full_recipe_with_a_wrong_dataset_dir_stops_before_training_naming_it(tmp_path):
    """The README's train command with a wrong --dataset_dir: a clear error naming the folder, nothing trained."""
    missing = tmp_path / "no_such_isbi2012_em"
    result = run_cli(
        "em_membrane_2d",
        [
            "--config_file",
            "configs/train.json",
            f"--dataset_dir={missing}",
            f"--output_dir={tmp_path / 'eval'}",
            f"--ckpt_dir={tmp_path / 'models'}",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr and str(missing) in result.stderr
    assert HELPER["em_membrane_2d"] in result.stderr, "the message says how to get the data"
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists(), "stopped before training"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_missing_data_folder_fails_in_initialize_unless_the_fallback_is_asked_for(bundle, tmp_path):
    missing = tmp_path / "absent"
    wf = workflow(bundle, dataset_dir=str(missing), **tiny(bundle, tmp_path))  # the recipe's own default: no fallback
    with pytest.raises(Exception) as err:
        wf.initialize()
    message = _error_chain(err)
    assert "FileNotFoundError" in message and str(missing) in message and HELPER[bundle] in message
    assert "--synthetic_fallback True" in message
    assert not (tmp_path / "eval").exists(), "no synthetic stand-in was written"
    # asking for the fallback explicitly gives the synthetic stand-in, in initialize
    workflow(bundle, **synthetic(tmp_path), **tiny(bundle, tmp_path)).initialize()
    assert (tmp_path / "eval" / SYNTHETIC_DIR[bundle]).is_dir()
