"""TopologyLoss / TopologyAwareLoss: a float64 reference with a small fixed extractor, VGG-19 gradients and
freezing, autocast, 3D slice sampling, multi-class, ignore_index, construction errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segloss
from segloss.losses import TopologyAwareLoss, TopologyLoss
from segloss.networks import WeightsNotFoundError, vgg


class TinyExtractor(nn.Module):
    """Two feature maps from a fixed random conv; records every input it sees."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 1, 3, 3, generator=g))
            self.conv.bias.copy_(torch.randn(4, generator=g))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        a = self.conv(x)
        return {"a": a, "b": F.max_pool2d(F.relu(a), 2)}


def ref_distance(ext, p, g, weights=(1.0, 1.0)):
    """Float64 per-image loss of (N,1,H,W) images through TinyExtractor's maths."""
    w, b = ext.conv.weight.double(), ext.conv.bias.double()

    def feats(x):
        a = F.conv2d(x.double(), w, b, padding=1)
        return [a, F.max_pool2d(F.relu(a), 2)]

    return sum(wt * (fp - fg).square().flatten(1).mean(1) for wt, fp, fg in zip(weights, feats(p), feats(g)))


def identity(x):
    return x


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv(vgg.WEIGHTS_ENV, raising=False)

    def fail(timeout):
        raise OSError("URLError: no network")

    monkeypatch.setattr(vgg, "_download", fail)


def _binary(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.7).float()


def test_zero_for_identical_prediction_and_target():
    target = _binary((2, 1, 32, 32))
    loss = TopologyLoss(other_act=identity, weights=None)
    assert loss(target.clone(), target).item() == 0.0
    logits = (2 * target - 1) * 50  # sigmoid saturates to exactly 0/1 in float32
    assert loss.__class__(sigmoid=True, weights=None)(logits, target).item() == 0.0
    label = torch.randint(0, 3, (2, 1, 32, 32))
    logits = F.one_hot(label[:, 0], 3).movedim(-1, 1).float() * 100
    assert TopologyLoss(softmax=True, weights=None)(logits, label).item() == 0.0
    assert loss(torch.rand(2, 1, 32, 32), target).item() > 0


def test_2d_value_matches_float64_reference_with_layer_weights():
    ext = TinyExtractor()
    target = _binary((3, 1, 12, 12))
    logits = torch.randn(3, 1, 12, 12)
    loss = TopologyLoss(sigmoid=True, feature_extractor=ext, layer_weights=[0.5, 2.0], reduction="none")
    out = loss(logits, target)
    assert out.shape == (3, 1, 1, 1)
    expected = ref_distance(ext, torch.sigmoid(logits.double()), target, (0.5, 2.0))
    torch.testing.assert_close(out.flatten().double(), expected, rtol=1e-5, atol=1e-7)
    sum_loss = TopologyLoss(sigmoid=True, feature_extractor=ext, layer_weights=[0.5, 2.0], reduction="sum")
    torch.testing.assert_close(sum_loss(logits, target).double(), expected.sum(), rtol=1e-5, atol=1e-7)


def test_multiclass_uses_each_foreground_channel_as_an_image():
    ext = TinyExtractor()
    B, C = 2, 3
    label = torch.randint(0, C, (B, 1, 10, 10))
    logits = torch.randn(B, C, 10, 10)
    value = TopologyLoss(softmax=True, feature_extractor=ext)(logits, label)
    pred_images = ext.seen[-1]
    assert pred_images.shape == (B * (C - 1), 1, 10, 10)  # background left out by default
    p = torch.softmax(logits.double(), 1)
    onehot = F.one_hot(label[:, 0], C).movedim(-1, 1).double()
    per_channel = [ref_distance(ext, p[:, c : c + 1], onehot[:, c : c + 1]) for c in (1, 2)]
    torch.testing.assert_close(value.double(), torch.stack(per_channel).mean(), rtol=1e-5, atol=1e-7)
    # the same with a one-hot target and with the background channel included
    dense = TopologyLoss(softmax=True, feature_extractor=ext)(logits, onehot.float())
    torch.testing.assert_close(dense, value)
    with_bg = TopologyLoss(softmax=True, include_background=True, feature_extractor=ext)(logits, label)
    per_channel.append(ref_distance(ext, p[:, :1], onehot[:, :1]))
    torch.testing.assert_close(with_bg.double(), torch.stack(per_channel).mean(), rtol=1e-5, atol=1e-7)


def test_vgg_gradient_reaches_prediction_only():
    loss = TopologyLoss(sigmoid=True, weights=None)
    assert not any(p.requires_grad for p in loss.parameters())
    assert len(list(loss.parameters())) == 16  # conv1_1..conv3_4: 8 convs, weight + bias, all frozen
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    value = loss(logits, _binary((2, 1, 32, 32)))
    value.backward()
    assert value.item() > 0
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())
    loss.train()
    assert not loss.feature_extractor.training


def test_custom_extractor_is_frozen_and_kept_in_eval():
    ext = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Dropout(0.5))
    loss = TopologyLoss(sigmoid=True, feature_extractor=ext)
    loss.train()
    assert loss.training and not any(m.training for m in ext.modules())
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss(logits, _binary((2, 1, 8, 8))).backward()
    assert all(p.grad is None and not p.requires_grad for p in ext.parameters())
    assert torch.equal(ext[1].running_mean, torch.zeros(2))  # no BatchNorm statistics update


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    loss = TopologyLoss(sigmoid=True, weights=None)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    target = _binary((2, 1, 32, 32))
    ref = loss(logits, target)
    dtypes = []
    loss.feature_extractor.register_forward_hook(lambda m, i, out: dtypes.extend(v.dtype for v in out.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target)
    assert set(dtypes) == {torch.bfloat16}  # the features really are bf16; the MSE is float32
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, ref, rtol=5e-2, atol=0)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_3d_slices_every_axis_and_matches_reference():
    ext = TinyExtractor()
    D, H, W = 4, 6, 8
    logits = torch.randn(2, 1, D, H, W)
    target = _binary((2, 1, D, H, W))
    value = TopologyLoss(sigmoid=True, feature_extractor=ext, num_slices=None)(logits, target)
    # target and prediction per axis: slices of (H, W), (D, W), (D, H)
    assert [tuple(x.shape) for x in ext.seen] == [(2 * D, 1, H, W)] * 2 + [(2 * H, 1, D, W)] * 2 + [
        (2 * W, 1, D, H)
    ] * 2
    p = torch.sigmoid(logits.double())
    per_axis = []
    for axis in (2, 3, 4):
        slices = [
            ref_distance(ext, p.select(axis, i), target.select(axis, i))  # (B, 1, h, w) slices
            for i in range(p.shape[axis])
        ]
        per_axis.append(torch.stack(slices).mean())
    torch.testing.assert_close(value.double(), torch.stack(per_axis).mean(), rtol=1e-5, atol=1e-7)


def test_3d_slice_sampling_is_seeded():
    logits = torch.randn(1, 1, 6, 7, 8)
    target = _binary((1, 1, 6, 7, 8))

    def run(generator, calls=2):
        ext = TinyExtractor()
        loss = TopologyLoss(sigmoid=True, feature_extractor=ext, num_slices=2, generator=generator)
        values = [loss(logits, target) for _ in range(calls)]
        return values, ext.seen

    v1, seen1 = run(7)
    v2, seen2 = run(torch.Generator().manual_seed(7))
    v3, seen3 = run(8)
    assert [tuple(x.shape) for x in seen1[:6]] == [(2, 1, 7, 8)] * 2 + [(2, 1, 6, 8)] * 2 + [(2, 1, 6, 7)] * 2
    assert all(torch.equal(a, b) for a, b in zip(seen1, seen2)) and v1 == v2
    assert not all(torch.equal(a, b) for a, b in zip(seen1, seen3))
    assert not all(torch.equal(a, b) for a, b in zip(seen1[:6], seen1[6:]))  # new slices on the next call


def test_ignore_index_masks_prediction_and_target():
    ext = TinyExtractor()
    label = torch.randint(0, 2, (2, 1, 12, 12))
    label[:, :, :4] = 255
    logits = torch.randn(2, 2, 12, 12)
    loss = TopologyLoss(softmax=True, feature_extractor=ext, ignore_index=255)
    value = loss(logits, label)
    target_img, pred_img = ext.seen[-2:]
    assert (target_img[..., :4, :] == 0).all() and (pred_img[..., :4, :] == 0).all()
    assert (pred_img[..., 4:, :] > 0).all()
    changed = logits.clone()
    changed[..., :4, :] = torch.randn(2, 2, 4, 12)
    torch.testing.assert_close(loss(changed, label), value)


def test_imagenet_construction_without_weights_raises_clearly(offline):
    with pytest.raises(WeightsNotFoundError, match="SEGLOSS_VGG19_WEIGHTS"):
        TopologyLoss(sigmoid=True, weights="imagenet")
    with pytest.raises(WeightsNotFoundError):
        TopologyAwareLoss(nn.BCEWithLogitsLoss(), topology_loss={"weights": "imagenet"})


def test_auto_weights_offline_use_mask_features_and_say_so(offline, caplog):
    with caplog.at_level("INFO", logger="segloss.losses.topology"):
        loss = TopologyLoss(sigmoid=True)
    assert isinstance(loss.feature_extractor, segloss.networks.MaskFeatures)
    assert [r.getMessage() for r in caplog.records if "MaskFeatures" in r.getMessage()]
    assert isinstance(
        TopologyAwareLoss(nn.BCEWithLogitsLoss()).losses["topology"].feature_extractor, segloss.networks.MaskFeatures
    )


def test_auto_weights_use_imagenet_vgg_when_on_disk(offline, tmp_path, monkeypatch, caplog):
    path = tmp_path / "vgg_truncated.pth"
    torch.save(vgg.VGG19Features(weights=None).features.state_dict(prefix="features."), path)
    monkeypatch.setenv(vgg.WEIGHTS_ENV, str(path))
    with caplog.at_level("INFO", logger="segloss.losses.topology"):
        loss = TopologyLoss(sigmoid=True)
    assert isinstance(loss.feature_extractor, vgg.VGG19Features)
    assert any("ImageNet VGG-19" in r.getMessage() for r in caplog.records)


def test_bad_arguments():
    ext = TinyExtractor()
    with pytest.raises(ValueError, match="num_slices"):
        TopologyLoss(feature_extractor=ext, num_slices=0)
    with pytest.raises(ValueError, match="layer_weights"):
        TopologyLoss(weights=None, layer_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="layer_weights"):
        TopologyLoss(feature_extractor=ext, layer_weights=[1.0, 1.0, 1.0])(
            torch.randn(1, 1, 8, 8), _binary((1, 1, 8, 8))
        )
    with pytest.raises(ValueError, match="layers"):
        TopologyLoss(feature_extractor=ext, layers=("conv1_1",))
    with pytest.raises(ValueError, match="input"):
        TopologyLoss(feature_extractor=ext)(torch.randn(1, 1, 8), torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="input"):
        TopologyLoss(sigmoid=True, feature_extractor=ext)(torch.full((1, 1, 8, 8), float("nan")), _binary((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="Incompatible"):
        TopologyLoss(sigmoid=True, softmax=True, feature_extractor=ext)


class WeightedBCE(nn.Module):
    def forward(self, input, target, weight_map=None):
        return F.binary_cross_entropy_with_logits(input, target, weight=weight_map)


def test_topology_aware_loss_sums_terms_and_routes_weight_map():
    ext = TinyExtractor()
    logits, target = torch.randn(2, 1, 8, 8), _binary((2, 1, 8, 8))
    weight_map = torch.rand(2, 1, 8, 8)
    topo = TopologyLoss(sigmoid=True, feature_extractor=ext)
    loss = TopologyAwareLoss(WeightedBCE(), mu=0.5, topology_loss=topo)
    expected = F.binary_cross_entropy_with_logits(logits, target, weight=weight_map) + 0.5 * topo(logits, target)
    torch.testing.assert_close(loss(logits, target, weight_map=weight_map), expected)
    assert loss.mu == 0.5 and set(loss.last_terms) == {"pixel", "topology"}
    with pytest.raises(ValueError, match="topology"):
        TopologyAwareLoss(WeightedBCE(), mu=-1.0, topology_loss=topo)


def test_topology_aware_loss_from_bundle_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "loss": {
                "_target_": "segloss.losses.TopologyAwareLoss",
                "pixel_loss": {"_target_": "monai.losses.DiceLoss", "sigmoid": True},
                "mu": 0.2,
                "topology_loss": {"sigmoid": True, "weights": None, "layers": ["conv1_2"]},
            }
        }
    )
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, segloss.TopologyAwareLoss) and loss.mu == 0.2
    assert loss.losses["topology"].feature_extractor.layers == ("conv1_2",)
    logits, target = torch.randn(1, 1, 16, 16), _binary((1, 1, 16, 16))
    assert torch.isfinite(loss(logits, target))


def test_image_smaller_than_the_receptive_field_raises_naming_the_size():
    loss = TopologyLoss(sigmoid=True, weights=None)  # conv1_2..conv3_4: two max-pools, so 4 x 4 at least
    x = torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="4 x 4"):
        loss(x, (x > 0).float())


def test_thin_3d_volume_skips_the_axes_whose_slices_are_too_small():
    ext = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2)).requires_grad_(False)
    assert segloss.losses.topology.min_image_size(ext) == 4
    p = torch.rand(1, 1, 2, 8, 6)
    g = (torch.rand(1, 1, 2, 8, 6) > 0.5).float()
    got = segloss.losses.topology.topology_loss(p, g, ext, min_size=4)
    # only the slices along D are 8 x 6; those along H (2 x 6) and W (2 x 8) are skipped
    want = segloss.losses.topology.feature_distance(ext, p[0, 0].unsqueeze(1), g[0, 0].unsqueeze(1)).mean()
    torch.testing.assert_close(got, want.view(1, 1))
    with pytest.raises(ValueError, match="no axis"):
        segloss.losses.topology.topology_loss(p[..., :3, :3], g[..., :3, :3], ext, min_size=4)
