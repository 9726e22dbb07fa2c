"""VGG19Features against an independent F.conv2d/relu/max_pool2d stack built here from the same tensors."""

import pytest
import torch
import torch.nn.functional as F

from segloss.networks import VGG19Features, WeightsNotFoundError, vgg

# torchvision's VGG-19 ("E"), written out independently of segloss: channels per conv, "M" = max-pool
CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
# ImageNet statistics as float32 constants (the module's buffers are float32 until `.to(float64)`)
MEAN = torch.tensor([0.485, 0.456, 0.406]).double().view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).double().view(1, 3, 1, 1)


def make_state_dict(num_convs=16, seed=1, classifier=True):
    """A state dict in torchvision's layout with random weights and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    sd, cin, n = {}, 3, 0
    for v in CFG:
        if v == "M":
            continue
        if n == num_convs:
            break
        idx = CONV_INDICES[n]
        sd[f"features.{idx}.weight"] = torch.randn(v, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        sd[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.1
        cin, n = v, n + 1
    if classifier:
        sd["classifier.0.weight"] = torch.randn(7, 5, generator=g)  # ignored by the loader
    return sd


def reference_activations(sd, x):
    """Every named activation (conv{b}_{i}, relu{b}_{i}, pool{b}) in float64 with plain functional ops."""
    x = x.double()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x - MEAN) / STD
    out, block, conv, n = {}, 1, 1, 0
    for v in CFG:
        if v == "M":
            x = F.max_pool2d(x, 2)
            out[f"pool{block}"] = x
            block, conv = block + 1, 1
            continue
        key = f"features.{CONV_INDICES[n]}"
        if f"{key}.weight" not in sd:
            break
        x = F.conv2d(x, sd[f"{key}.weight"].double(), sd[f"{key}.bias"].double(), padding=1)
        out[f"conv{block}_{conv}"] = x
        x = F.relu(x)
        out[f"relu{block}_{conv}"] = x
        conv, n = conv + 1, n + 1
    return out


ALL_LAYERS = list(reference_activations(make_state_dict(), torch.rand(1, 3, 32, 32)))


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty hub cache, no env var, and a download that fails like an offline machine."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(vgg.WEIGHTS_ENV, raising=False)

    def offline(timeout):
        raise OSError("URLError: <urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(vgg, "_download", offline)
    return tmp_path


def test_full_checkpoint_matches_reference_at_every_layer(tmp_path):
    assert len(ALL_LAYERS) == 16 * 2 + 5
    sd = make_state_dict()
    path = tmp_path / "full.pth"
    torch.save(sd, path)
    net = VGG19Features(layers=ALL_LAYERS, weights=path).double()
    assert [k for k in net.state_dict()] == [k for k in sd if k.startswith("features.")]
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    out = net(x)
    ref = reference_activations(sd, x)
    assert list(out) == ALL_LAYERS
    for name in ALL_LAYERS:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_truncated_state_dict_and_grey_input(tmp_path):
    sd = make_state_dict(num_convs=4, classifier=False)  # up to conv2_2 (features.7)
    path = tmp_path / "trunc.pt"
    torch.save(sd, path)
    net = VGG19Features(layers=("conv2_2", "relu1_1"), weights=path)
    assert len(net.features) == 8  # built only up to the deepest requested layer
    x = torch.rand(2, 1, 16, 16)
    out = net(x)
    assert list(out) == ["conv2_2", "relu1_1"]
    ref = reference_activations(sd, x)
    for name in out:
        torch.testing.assert_close(out[name].double(), ref[name], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net(x.repeat(1, 3, 1, 1))["conv2_2"], out["conv2_2"])
    with pytest.raises(ValueError, match=r"features\.10\.weight"):
        VGG19Features(layers=("conv3_1",), weights=path)


def test_wrong_shape_or_missing_key_names_the_key():
    sd = make_state_dict(num_convs=4)
    sd["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    with pytest.raises(ValueError, match=r"'features\.5\.weight'.*\(128, 64, 3, 3\)"):
        VGG19Features(layers=("conv2_1",), weights=sd)
    sd = make_state_dict(num_convs=4)
    del sd["features.2.bias"]
    with pytest.raises(ValueError, match=r"features\.2\.bias"):
        VGG19Features(layers=("conv1_2",), weights=sd)


def test_bad_layer_names_and_input():
    with pytest.raises(ValueError, match="layers"):
        VGG19Features(layers=("conv6_1",), weights=None)
    with pytest.raises(ValueError, match="layers"):
        VGG19Features(layers=("conv1_1", "conv1_1"), weights=None)
    with pytest.raises(ValueError, match="layers"):
        VGG19Features(layers=(), weights=None)
    net = VGG19Features(layers=("conv1_1",), weights=None)
    with pytest.raises(ValueError, match="`x`"):
        net(torch.rand(1, 2, 8, 8))


def _loaded_from(net, sds):
    w = net.features[0].weight
    return [i for i, sd in enumerate(sds) if torch.equal(w, sd["features.0.weight"])]


def test_weights_search_order(no_weights_anywhere, monkeypatch):
    tmp = no_weights_anywhere
    sds = [make_state_dict(num_convs=1, seed=s) for s in range(3)]
    explicit, env, hub = tmp / "explicit.pt", tmp / "env.pt", tmp / "hub" / "checkpoints" / vgg.VGG19_FILENAME
    hub.parent.mkdir(parents=True)
    for sd, path in zip(sds, (explicit, env, hub)):
        torch.save(sd, path)
    monkeypatch.setattr(vgg, "VGG19_SIZE", hub.stat().st_size)  # a tiny stand-in for the canonical file
    monkeypatch.setenv(vgg.WEIGHTS_ENV, str(env))
    layers = ("conv1_1",)
    assert _loaded_from(VGG19Features(layers, weights=explicit), sds) == [0]  # explicit path beats env var
    assert _loaded_from(VGG19Features(layers), sds) == [1]  # env var beats hub cache
    monkeypatch.delenv(vgg.WEIGHTS_ENV)
    assert _loaded_from(VGG19Features(layers), sds) == [2]  # hub cache
    with pytest.raises(ValueError, match="SHA-256"):  # the stand-in's hash is not dcbb9e9d...
        VGG19Features(layers, check_hash=True)
    monkeypatch.setenv(vgg.WEIGHTS_ENV, str(tmp / "missing.pt"))
    with pytest.raises(WeightsNotFoundError, match=vgg.WEIGHTS_ENV):  # a set env var is not skipped silently
        VGG19Features(layers)


def test_truncated_canonical_file_is_reported(no_weights_anywhere):
    hub = no_weights_anywhere / "hub" / "checkpoints" / vgg.VGG19_FILENAME
    hub.parent.mkdir(parents=True)
    torch.save(make_state_dict(num_convs=1), hub)
    with pytest.raises(ValueError, match="574,673,361"):
        VGG19Features(("conv1_1",))


def test_no_weights_error_lists_every_option(no_weights_anywhere):
    with pytest.raises(WeightsNotFoundError) as info:
        VGG19Features()
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    for option in ("weights=", vgg.WEIGHTS_ENV, str(no_weights_anywhere / "hub" / "checkpoints"), vgg.VGG19_URL):
        assert option in msg
    assert "Name or service not known" in msg  # the reason the download failed
    with pytest.raises(WeightsNotFoundError, match="download=False"):
        VGG19Features(download=False)
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        VGG19Features(weights=no_weights_anywhere / "nowhere.pth")


def test_download_goes_through_torch_hub_with_hash_check(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv(vgg.WEIGHTS_ENV, raising=False)
    calls = []

    def fake_load(url, **kwargs):
        calls.append((url, kwargs))
        return make_state_dict(num_convs=1)

    monkeypatch.setattr(vgg, "_reachable", lambda url, timeout: None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load)
    VGG19Features(("conv1_1",))
    assert calls[0][0] == vgg.VGG19_URL and calls[0][1]["check_hash"] is True


def test_frozen_eval_and_gradient_only_to_input():
    net = VGG19Features(("conv1_2", "relu2_1"), weights=None)
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    net.requires_grad_(True)  # even then the forward pass uses detached weights
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    sum(v.square().sum() for v in net(x).values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = VGG19Features(("conv2_1",), weights=None, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = VGG19Features(("conv2_1",), weights=None, seed=3)
    c = VGG19Features(("conv2_1",), weights=None, seed=4)
    assert torch.equal(a.features[5].weight, b.features[5].weight)
    assert not torch.equal(a.features[5].weight, c.features[5].weight)


def test_follows_dtype():
    sd = make_state_dict(num_convs=2)
    net = VGG19Features(("conv1_2",), weights=sd).to(torch.float64)
    assert net.mean.dtype == torch.float64
    x = torch.rand(1, 3, 8, 8)  # float32 input is cast to the module's dtype
    out = net(x)["conv1_2"]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_activations(sd, x)["conv1_2"], rtol=1e-10, atol=1e-10)
