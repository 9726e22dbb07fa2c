"""A frozen VGG-19 feature extractor (the convolutional stack of Simonyan & Zisserman, ICLR 2015) that loads
torchvision's ImageNet checkpoint without importing torchvision.

The module keeps torchvision's ``vgg19().features`` layout (an ``nn.Sequential`` whose convolutions sit at
indices 0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34), so ``vgg19-dcbb9e9d.pth`` or any
truncated state dict of it loads key for key (``features.N.weight`` / ``features.N.bias``; ``classifier.*`` keys
are ignored).

Where the weights come from (``weights="imagenet"``), first match wins:

1. an explicit path (``weights="/path/to/vgg19-dcbb9e9d.pth"``) or an in-memory state dict;
2. the environment variable ``SEGLOSS_VGG19_WEIGHTS`` (a path);
3. torch hub's checkpoint cache, ``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``;
4. a download from ``https://download.pytorch.org/models/vgg19-dcbb9e9d.pth`` into that cache with
   ``torch.hub.load_state_dict_from_url(..., check_hash=True)`` (the full SHA-256 prefix check) when online;
   a short reachability probe runs first so an offline machine fails in seconds, not at a TCP timeout.

When nothing works :class:`WeightsNotFoundError` lists these options. Integrity of files found on disk: a file
with the canonical name ``vgg19-dcbb9e9d.pth`` must have the published size (574,673,361 bytes; catches
interrupted downloads at no cost); ``check_hash=True`` additionally hashes it (SHA-256 must begin with
``dcbb9e9d``; about a second). Other files (e.g. truncated state dicts) are checked only key by key: every
required key must be present with the right shape.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VGG19_LAYERS",
    "VGG19_URL",
    "VGG19Features",
    "WeightsNotFoundError",
    "load_vgg19_state_dict",
    "vgg19_conv_shapes",
]

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILENAME = "vgg19-dcbb9e9d.pth"
VGG19_SIZE = 574_673_361
VGG19_SHA256_PREFIX = "dcbb9e9d"
WEIGHTS_ENV = "SEGLOSS_VGG19_WEIGHTS"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's configuration "E": output channels of each 3x3 conv, "M" = 2x2 max-pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _layer_table() -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    """Names -> index in ``features``, and (index, in_channels, out_channels) of every conv."""
    names: dict[str, int] = {}
    convs: list[tuple[int, int, int]] = []
    block, conv, idx, in_ch = 1, 1, 0, 3
    for v in _CFG:
        if v == "M":
            names[f"pool{block}"] = idx
            idx += 1
            block, conv = block + 1, 1
        else:
            names[f"conv{block}_{conv}"] = idx
            names[f"relu{block}_{conv}"] = idx + 1
            convs.append((idx, in_ch, v))
            idx, conv, in_ch = idx + 2, conv + 1, v
    return names, convs


_NAME_TO_INDEX, _CONVS = _layer_table()
VGG19_LAYERS: tuple[str, ...] = tuple(_NAME_TO_INDEX)


def vgg19_conv_shapes(upto: int | None = None) -> list[tuple[int, int, int]]:
    """``(index, in_channels, out_channels)`` of the 3x3 convs in ``features``, those with index <= ``upto``."""
    return [c for c in _CONVS if upto is None or c[0] <= upto]


class WeightsNotFoundError(FileNotFoundError):
    """No VGG-19 weights were found; the message lists every way to provide them."""


def _options_message(reason: str) -> str:
    return (
        f"VGG-19 ImageNet weights not found ({reason}). Provide them in one of these ways:\n"
        f"  1. pass a path: weights='/path/to/{VGG19_FILENAME}' (any state dict in torchvision's "
        "`features.N.weight` layout, truncated ones included);\n"
        f"  2. set the environment variable {WEIGHTS_ENV}=/path/to/{VGG19_FILENAME};\n"
        f"  3. place the file in torch hub's cache: {_hub_checkpoint_path()};\n"
        f"  4. download it by hand from {VGG19_URL} (574,673,361 bytes, SHA-256 begins with "
        f"{VGG19_SHA256_PREFIX}) to one of the places above; or go online once and it is downloaded to (3).\n"
        "For tests, weights=None gives a seeded random initialisation."
    )


def _hub_checkpoint_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILENAME


def _check_canonical_file(path: Path, check_hash: bool) -> None:
    """Cheap integrity checks, only for a file carrying the checkpoint's published name."""
    if path.name != VGG19_FILENAME:
        return
    size = path.stat().st_size
    if size != VGG19_SIZE:
        raise ValueError(
            f"{path} is {size:,} bytes but {VGG19_FILENAME} has {VGG19_SIZE:,}: an interrupted download? "
            f"Delete it and download it again from {VGG19_URL}."
        )
    if check_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        if not digest.hexdigest().startswith(VGG19_SHA256_PREFIX):
            raise ValueError(f"{path}: SHA-256 {digest.hexdigest()[:16]}... does not begin with {VGG19_SHA256_PREFIX}.")


def _read_state_dict(path: Path, check_hash: bool) -> Mapping[str, torch.Tensor]:
    _check_canonical_file(path, check_hash)
    try:
        # mmap reads only the tensors used (the full checkpoint is mostly classifier weights)...
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # ...but works only for the zip serialisation format; older files are read whole.
        return torch.load(path, map_location="cpu", weights_only=True)


def _reachable(url: str, timeout: float) -> str | None:
    """None if ``url`` answers a HEAD request within ``timeout`` seconds, else the reason it does not."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered (perhaps refusing HEAD): let torch.hub try the real request
    except Exception as e:  # no network, DNS failure, proxy refusal, timeout: no download possible
        return f"{type(e).__name__}: {e}"
    return None


def _download(timeout: float) -> Mapping[str, torch.Tensor]:
    """Download the checkpoint into torch hub's cache (SHA-256 prefix checked by torch.hub)."""
    reason = _reachable(VGG19_URL, timeout)
    if reason is not None:
        raise OSError(reason)
    return torch.hub.load_state_dict_from_url(
        VGG19_URL, map_location="cpu", check_hash=True, progress=False, weights_only=True
    )


def load_vgg19_state_dict(
    weights: str | os.PathLike | Mapping[str, torch.Tensor] = "imagenet",
    *,
    download: bool = True,
    check_hash: bool = False,
    timeout: float = 10.0,
) -> Mapping[str, torch.Tensor]:
    """Find and read VGG-19 weights in torchvision's layout (see the module docstring for the search order).

    Args:
        weights: ``"imagenet"`` to search, a path, or a state dict (returned as is).
        download: allow step 4 (download) of the search.
        check_hash: hash a file named ``vgg19-dcbb9e9d.pth`` found on disk (its size is always checked).
        timeout: seconds for the reachability probe before a download.

    Raises:
        WeightsNotFoundError: an explicit path or ``$SEGLOSS_VGG19_WEIGHTS`` names a missing file, or the search
            found nothing; the message lists the options.
        ValueError: a canonically named file has the wrong size (or hash).
    """
    if isinstance(weights, Mapping):
        return weights
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"`weights` must be 'imagenet', None, a path or a state dict, got {type(weights).__name__}.")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(_options_message(f"`weights` path {str(path)!r} does not exist"))
        return _read_state_dict(path, check_hash)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(_options_message(f"${WEIGHTS_ENV}={env!r} is not a file"))
        return _read_state_dict(path, check_hash)
    cached = _hub_checkpoint_path()
    if cached.is_file():
        return _read_state_dict(cached, check_hash)
    if not download:
        raise WeightsNotFoundError(_options_message("not in the hub cache and download=False"))
    try:
        return _download(timeout)
    except Exception as e:  # an offline machine must get the list of options, not a urllib traceback
        raise WeightsNotFoundError(_options_message(f"download failed: {type(e).__name__}: {e}")) from e


class VGG19Features(nn.Module):
    """Frozen VGG-19 convolutional features at named layers.

    Layer names: ``conv{b}_{i}`` is the output of the i-th conv of block b **before** its ReLU, ``relu{b}_{i}``
    after it, ``pool{b}`` after block b's max-pool (b = 1..5; blocks 1-2 have 2 convs, blocks 3-5 have 4). The
    network is built only up to the deepest requested layer.

    Input ``(B, 1, H, W)`` or ``(B, 3, H, W)`` with values in [0, 1]; it is normalised with the ImageNet mean and
    std, and a 1-channel input is broadcast to the 3 RGB channels (grey image). Output: a dict ``name -> (B, C_l,
    H_l, W_l)`` in the order of ``layers``.

    The module is always frozen: parameters have ``requires_grad=False``, the forward pass uses detached weights
    (so gradients never reach them even if someone flips ``requires_grad``), and :meth:`train` keeps eval mode.
    Gradients do flow to the *input*. ``.to(device / dtype)`` moves everything; under autocast the convs run in
    the autocast dtype.

    Args:
        layers: names of the layers to return (at least one, no repeats).
        weights: ``"imagenet"`` (search, see :func:`load_vgg19_state_dict`), a path, a state dict, or None for a
            seeded random initialisation (He normal with fan-out, zero bias, as torchvision; for tests).
        seed: seed of the random initialisation (``weights=None``); the global RNG is not touched.
        download, check_hash, timeout: passed to :func:`load_vgg19_state_dict`.

    Raises:
        WeightsNotFoundError: no weights found (at construction).
        ValueError: an unknown or repeated layer name; a missing or wrong-shaped key in the state dict (named).
    """

    def __init__(
        self,
        layers: Sequence[str] = ("conv1_2", "conv2_2", "conv3_4"),
        weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = "imagenet",
        *,
        seed: int = 0,
        download: bool = True,
        check_hash: bool = False,
        timeout: float = 10.0,
    ) -> None:
        super().__init__()
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        unknown = [n for n in layers if n not in _NAME_TO_INDEX]
        if not layers or unknown:
            raise ValueError(f"`layers` must name at least one of {list(VGG19_LAYERS)}; unknown: {unknown}.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"`layers` holds repeated names: {list(layers)}.")
        self.layers = layers
        self._index_to_name = {_NAME_TO_INDEX[n]: n for n in layers}
        depth = max(self._index_to_name) + 1
        conv_at = {idx: (cin, cout) for idx, cin, cout in vgg19_conv_shapes(depth - 1)}
        modules: list[nn.Module] = []
        for idx in range(depth):
            if idx in conv_at:
                # skip_init: no default init, so building the network does not consume the global RNG
                modules.append(nn.utils.skip_init(nn.Conv2d, *conv_at[idx], kernel_size=3, padding=1))
            elif idx - 1 in conv_at:
                modules.append(nn.ReLU())
            else:
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*modules)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is None:
            self._random_init(seed)
        else:
            state = load_vgg19_state_dict(weights, download=download, check_hash=check_hash, timeout=timeout)
            self._load_features(state)
        self.requires_grad_(False)
        super().train(False)

    @torch.no_grad()
    def _random_init(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
                m.bias.zero_()

    @torch.no_grad()
    def _load_features(self, state: Mapping[str, torch.Tensor]) -> None:
        for idx, m in enumerate(self.features):
            if not isinstance(m, nn.Conv2d):
                continue
            for name, param in (("weight", m.weight), ("bias", m.bias)):
                key = f"features.{idx}.{name}"
                if key not in state:
                    raise ValueError(
                        f"VGG-19 state dict lacks key {key!r} (needed for layers {list(self.layers)}); "
                        "expected torchvision's `features.N.weight` / `features.N.bias` layout."
                    )
                value = state[key]
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"VGG-19 state dict key {key!r} has shape {got}, expected {tuple(param.shape)}.")
                param.copy_(value)

    def train(self, mode: bool = True) -> VGG19Features:
        """Stays in eval mode: the extractor is a fixed measuring device."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"`x` must have shape (B, 1, H, W) or (B, 3, H, W), got {tuple(x.shape)}.")
        # (B,1,...) broadcasts against the 3-channel mean/std: a grey image repeated to RGB, then normalised.
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        for idx, m in enumerate(self.features):
            if isinstance(m, nn.Conv2d):
                x = F.conv2d(x, m.weight.detach(), m.bias.detach(), padding=1)
            else:
                x = m(x)
            if idx in self._index_to_name:
                out[self._index_to_name[idx]] = x
        return {name: out[name] for name in self.layers}
