"""MaskFeatures: the shipped weights load and reproduce recorded features, the module is frozen, its training
script runs end to end, and on held-out ISBI labels its term ranks cuts far above harmless border noise."""

import importlib.util
import sys

import pytest
import torch
from conftest import REPO_ROOT

from segloss.networks import MaskFeatures, VGG19Features, mask_features_weights_path

BENCHMARKS = REPO_ROOT / "benchmarks"
# Per-map mean and std of the shipped 2D features of FIXED_INPUT (recorded when the weights were trained).
RECORDED_2D = [(1.14034e-05, 4.09721e-05), (0.00286856, 0.00421486), (-0.308182, 3.81701)]


def fixed_input(spatial):
    """A deterministic soft mask: a ring and a bar, independent of any RNG."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in spatial), indexing="ij")
    r = sum(a.square() for a in axes).sqrt()
    return (torch.sigmoid((0.08 - (r - 0.6).abs()) * 40) + torch.sigmoid((0.05 - axes[0].abs()) * 40)).clamp(0, 1)[
        None, None
    ]


def load_script(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_shipped_2d_weights_give_recorded_features():
    assert mask_features_weights_path(2).is_file()
    feats = MaskFeatures(2)(fixed_input((64, 64)))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 32, 8, 8)]
    got = [(f.mean().item(), f.std().item()) for f in feats]
    for (m, s), (rm, rs) in zip(got, RECORDED_2D):
        assert m == pytest.approx(rm, rel=1e-3, abs=1e-4 * rs) and s == pytest.approx(rs, rel=1e-3)


def test_frozen_gradient_reaches_input_only():
    net = MaskFeatures(2)
    net.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = fixed_input((32, 32)).requires_grad_(True)
    sum(f.square().sum() for f in net(x)).backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x"):
        net(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims"):
        MaskFeatures(4)


def test_training_script_runs_end_to_end(shared_data, tmp_path, capsys):
    isbi = shared_data("isbi2012_em")
    script = load_script("train_mask_features")
    net = script.train(2, steps=2, seed=0, isbi=isbi, batch=2, log_every=1)
    out = capsys.readouterr().out
    assert "step     2" in out and "cos" in out
    torch.save(net.state_dict(), tmp_path / "mf.pt")
    assert torch.isfinite(net.scale).all()
    feats = MaskFeatures(2, tmp_path / "mf.pt")(fixed_input((32, 32)))
    assert all(torch.isfinite(f).all() for f in feats)


def test_heldout_isbi_cuts_outrank_border_noise(shared_data):
    """ISBI sections 24-29 (never read by the training): cuts vs the same pixel count of thinning/thickening."""
    prior = load_script("topology_prior")
    crops = prior.heldout_crops_2d(shared_data("isbi2012_em"))[::3]
    ours = prior.property_ratios(MaskFeatures(2), crops, num_cuts=25)
    assert min(ours.values()) >= 4.0
    vgg = prior.property_ratios(VGG19Features(("conv1_2", "conv2_2"), weights=None), crops[:2], num_cuts=25)
    assert max(vgg.values()) < min(ours.values()) / 2
