"""MaskFeatures: the shipped weights load and reproduce recorded features, the module is frozen, its training
script runs end to end, on held-out labels its term ranks cuts above harmless border noise (random VGG-19 ranks
them below), and gradient steps of the term alone spend themselves on the cuts first."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from scipy import ndimage

from segloss.networks import MaskFeatures, VGG19Features, mask_features_weights_path

BENCHMARKS = REPO_ROOT / "benchmarks"
# What the shipped weights measure, with a margin (docs/mask_features.md has the full figures). The issue's
# target is 10x; the weights that pass the gradient test reach less (see the docs).
PROPERTY_MIN_2D = 2.0
PROPERTY_MIN_3D = 1.3
# Per-map mean and std of the shipped features of fixed_input (recorded when the weights were trained).
RECORDED_2D = [(0.00034661, 0.000490249), (0.0442695, 0.0687148), (0.00789152, 2.44375)]
RECORDED_3D = [(-0.09596, 2.91507), (-0.104754, 0.866878), (-0.00205145, 0.743832)]


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


@pytest.mark.slow
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


def test_simple_points_keep_the_betti_numbers():
    """``is_simple`` (3x3 / 3x3x3 window) against the Betti numbers of random 5^n masks before and after flipping
    the centre: a simple point never changes them; in 2D a flip that keeps them is always simple (in 3D one
    voxel can open one tunnel and close another, so there the converse does not hold)."""
    from segloss.metrics import betti_numbers

    script = load_script("train_mask_features")
    rng = np.random.default_rng(0)
    for ndim, trials in ((2, 600), (3, 300)):
        outcomes = []
        for _ in range(trials):
            m = rng.random((5,) * ndim) < rng.uniform(0.2, 0.8)
            flipped = m.copy()
            flipped[(2,) * ndim] ^= True
            keeps = bool((betti_numbers(m) == betti_numbers(flipped)).all())
            outcomes.append((script.is_simple(m[(slice(1, 4),) * ndim]), keeps))
        assert sum(simple for simple, _ in outcomes) > trials // 5
        assert all(keeps for simple, keeps in outcomes if simple), ndim
        if ndim == 2:
            assert all(simple for simple, keeps in outcomes if keeps)


def test_harmless_noise_keeps_the_topology(shared_data):
    """The 'harmless' thinning and thickening of the property and gradient tests (and of the training) flip the
    pixels asked for and change no Betti number; a cut does."""
    from segloss.metrics import betti_number_error

    script, prior = load_script("train_mask_features"), load_script("topology_prior")
    rng = np.random.default_rng(0)
    for g, count in [
        (prior.heldout_crops_2d(shared_data("isbi2012_em"))[0], 1000),
        (prior.heldout_volumes_3d(1)[0], 150),
    ]:
        for kind in ("thin", "thick"):
            flips = script.harmless(rng, g, count, kind)
            assert flips.sum() == count and not (flips & (g if kind == "thick" else ~g)).any()
            assert betti_number_error(g ^ flips, g).sum() == 0, (g.ndim, kind)
        assert betti_number_error(g & ~script.cuts(rng, g, 5), g).sum() > 0


def test_euler_reference_sums_to_the_euler_number():
    from skimage.measure import euler_number

    prior = load_script("topology_prior")
    rng = np.random.default_rng(0)
    for shape in ((24, 24), (12, 12, 12)):
        m = ndimage.binary_opening(rng.random(shape) < 0.55)
        chi = prior.euler_density(torch.from_numpy(m.astype(np.float32))[None, None]).sum().item()
        assert chi == pytest.approx(euler_number(m, connectivity=m.ndim), abs=1e-4)


def test_heldout_isbi_cuts_outrank_border_noise(shared_data):
    """ISBI sections 24-29 (never read by the training): cuts vs the same pixel count of thinning/thickening."""
    prior = load_script("topology_prior")
    crops = prior.heldout_crops_2d(shared_data("isbi2012_em"))[::3]
    ours = prior.property_ratios(MaskFeatures(2), crops, num_cuts=25)
    assert min(ours.values()) >= PROPERTY_MIN_2D
    vgg = prior.property_ratios(VGG19Features(("conv1_2", "conv2_2"), weights=None), crops[:2], num_cuts=25)
    assert max(vgg.values()) < 1.0 < PROPERTY_MIN_2D


@pytest.mark.slow
def test_gradient_steps_of_the_term_alone_close_cuts_first(shared_data):
    """A soft held-out label with cuts and as much harmless border noise: 30 max-normalised gradient steps of the
    term alone on its logits lower its Betti error and set right a larger share of the cut pixels than of the
    noise pixels. Random VGG-19 features also lower the Betti error (they are nearly invertible, so the term alone
    rebuilds the label), but they fix the noise first (10 steps: it costs 30x as much): no topology prior."""
    prior = load_script("topology_prior")
    crops = [c[64:192, 64:192] for c in prior.heldout_crops_2d(shared_data("isbi2012_em"))[::6]]
    ours = prior.gradient_test(MaskFeatures(2), crops, num_cuts=4, steps=30)
    assert ours["betti_after"] < 0.6 * ours["betti_before"]
    assert ours["cuts_fixed"] > ours["noise_fixed"]
    vgg = prior.gradient_test(VGG19Features(weights=None), crops[:2], num_cuts=4, steps=10)
    assert vgg["cuts_fixed"] < vgg["noise_fixed"]
    # per pixel, the first step pushes a cut pixel harder, relative to a noise pixel, than a pixel loss does (the
    # shipped prior: 1.35x against pixel L2's 0.57x; random VGG-19 0.25x)
    pixel = prior.gradient_test(prior.pixel_features, crops, num_cuts=4, steps=1)
    assert ours["selectivity"] > 1.5 * pixel["selectivity"] > 1.5 * vgg["selectivity"]


def test_shipped_3d_weights_give_recorded_features():
    assert mask_features_weights_path(3).is_file()
    feats = MaskFeatures(3)(fixed_input((32, 32, 32)))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 16, 16), (1, 16, 8, 8, 8), (1, 16, 4, 4, 4)]
    got = [(f.mean().item(), f.std().item()) for f in feats]
    for (m, s), (rm, rs) in zip(got, RECORDED_3D):
        assert m == pytest.approx(rm, rel=1e-3, abs=1e-4 * rs) and s == pytest.approx(rs, rel=1e-3)


def test_auto_topology_loss_scores_volumes_with_the_native_3d_prior(monkeypatch, tmp_path):
    from segloss.losses import TopologyLoss
    from segloss.losses.topology import feature_distance
    from segloss.networks import vgg

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no ImageNet VGG-19 on this machine
    monkeypatch.delenv(vgg.WEIGHTS_ENV, raising=False)
    loss = TopologyLoss(sigmoid=True, reduction="none")
    assert loss.volume_extractor.spatial_dims == 3
    logits = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    target = (fixed_input((16, 16, 16)) > 0.5).float().repeat(2, 1, 1, 1, 1)
    expected = feature_distance(MaskFeatures(3), torch.sigmoid(logits), target)
    torch.testing.assert_close(loss(logits, target).flatten(), expected)


@pytest.mark.slow
def test_heldout_3d_cut_vessels_outrank_surface_noise():
    """Vessel trees of a seed the training never used: cuts vs surface thinning/thickening of equal voxel count."""
    prior = load_script("topology_prior")
    volumes = prior.heldout_volumes_3d(num=2)
    ours = prior.property_ratios(MaskFeatures(3), volumes, num_cuts=6)
    assert min(ours.values()) >= PROPERTY_MIN_3D
    vgg = prior.property_ratios(VGG19Features(("conv1_2",), weights=None), volumes[:1], num_cuts=6)
    assert max(vgg.values()) < min(ours.values())


@pytest.mark.slow
def test_exact_topology_passes_the_ranking_test_but_its_gradient_opens_more_cuts(shared_data):
    """The local Euler characteristic (32 px windows, no weights) ranks held-out cuts 10x above topology-keeping
    border noise, which no trained MaskFeatures reached, yet gradient steps of its term raise the Betti error: the
    ranking bar and the gradient bar of the prior ask different things (docs/mask_features.md)."""
    prior = load_script("topology_prior")
    crops = prior.heldout_crops_2d(shared_data("isbi2012_em"))
    assert min(prior.property_ratios(prior.euler_features, crops[::3], num_cuts=25).values()) >= 10.0
    steps = prior.gradient_test(prior.euler_features, [c[64:192, 64:192] for c in crops[::6]], num_cuts=4, steps=30)
    assert steps["betti_after"] > steps["betti_before"] and steps["cuts_fixed"] < steps["noise_fixed"]
