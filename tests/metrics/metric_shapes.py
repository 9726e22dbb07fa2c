"""Constructed masks with known topology, shared by the metric tests (imported as a sibling module like
tests/bundles/bundle_utils.py)."""

import numpy as np
import torch

N = 32


def disc(r, centre=(N // 2, N // 2), n=N):
    yy, xx = np.mgrid[:n, :n]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


RING = disc(10) & ~disc(6)
CUT_RING = RING.copy()
CUT_RING[14:19, 20:] = False  # one cut through the right side of the ring
TWO_DISCS = disc(4, (8, 8)) | disc(4, (22, 22))

_Z, _Y, _X = np.mgrid[:24, :24, :24] - 11.5
_R = np.sqrt(_Z**2 + _Y**2 + _X**2)
HOLLOW_SPHERE = (_R <= 9) & (_R >= 5)
SOLID_TORUS = (np.sqrt(_X**2 + _Y**2) - 7) ** 2 + _Z**2 <= 9
BALL = _R <= 6


def line(length=20, n=N, row=N // 2, start=6, gap=()):
    m = np.zeros((n, n), dtype=bool)
    m[row, start : start + length] = True
    m[row, [start + g for g in gap]] = False
    return m


def onehot(*masks):
    """(1, C + 1, *) one-hot tensor: background + one channel per (disjoint) mask."""
    fg = np.stack(masks).astype(np.float32)
    return torch.from_numpy(np.concatenate([1 - fg.max(0, keepdims=True), fg]))[None]
