"""Is a topology term's feature extractor a topology prior? Two measurements on labels it never saw.

- **Property**: the term ``d(x) = sum_n mean((f_n(x) - f_n(g))^2)`` of a label ``g`` with small cuts across the
  structure, divided by ``d`` of the same number of flipped pixels of border thinning (resp. thickening) that
  keeps the topology (every flip a simple point, ``train_mask_features.harmless``), per flipped pixel. 2D:
  25 cuts (radius = local half-width + 1 px) on the four 256^2 quadrants of ISBI 2012 label sections 24-29 (the
  MaskFeatures training read 00-23 only). 3D: 6 cuts on held-out ``vessels_3d`` trees (seed 1000, 64^3) against
  surface thinning / thickening of the same voxel count. Medians over the crops.
- **Gradient test**: a soft imperfect prediction (the label with cuts, plus border thinning and thickening of as
  many pixels as the cuts each, blurred with sigma 1, in ``[0.05, 0.95]``) takes ``steps`` gradient steps of the
  term alone on its logits, each scaled so that the largest logit change is ``lr`` (so the extractors' gradient
  scales do not matter). Betti error (:func:`segloss.metrics.betti_number_error`, summed over k) and Dice of
  ``p > 0.5`` before and after, and the fractions of the cut pixels and of the noise pixels set right. Centre
  128^2 crops of one quadrant in six, 4 cuts each.
- **Gradient selectivity**: on the same soft predictions, the first step's mean ``|dd/dz|`` on the cut pixels
  over its mean on the harmless-noise pixels. A pixel loss gives about 1x (both kinds of pixel are equally
  wrong); a term that closes cuts without reshaping borders needs well above 1x. The pixel L2 row (identity
  features) is that reference.

Beside MaskFeatures and random VGG-19: pixel L2 and the local Euler characteristic (:func:`euler_features`), an
exact topological measurement with no weights, which shows what the property test asks for and that passing it
does not make a gradient that closes cuts.

    python benchmarks/topology_prior.py            # markdown tables on stdout, MaskFeatures vs random VGG-19
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mask_features import DEFAULT_ISBI, cuts, harmless, isbi_membranes  # noqa: E402

from segloss.data.synthetic import VESSEL, vessels_3d  # noqa: E402
from segloss.losses.topology import feature_distance, topology_loss  # noqa: E402
from segloss.metrics import betti_number_error  # noqa: E402
from segloss.networks import MaskFeatures, VGG19Features  # noqa: E402

HELDOUT_SECTIONS = tuple(range(24, 30))
EULER_WINDOW = 32


def heldout_crops_2d(root: Path = DEFAULT_ISBI, sections=HELDOUT_SECTIONS) -> list[np.ndarray]:
    """The four 256^2 quadrants of each held-out ISBI label section (membrane = True)."""
    return [m[y : y + 256, x : x + 256] for m in isbi_membranes(root, sections) for y in (0, 256) for x in (0, 256)]


def heldout_volumes_3d(num: int = 4, size: int = 64, seed: int = 1000) -> list[np.ndarray]:
    return list(vessels_3d(num, size, seed=seed, organ=False)[1][:, 0] == VESSEL)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]


def property_ratios(extractor, labels, num_cuts: int, seed: int = 0) -> dict[str, float]:
    """Median over labels of d(cuts) / d(thinning) and d(cuts) / d(thickening) per flipped pixel. The noise flips
    as many pixels as the cuts unless its candidates run out (a thin 3D tree that the cuts mostly remove)."""
    rng = np.random.default_rng(seed)
    ratios = {"thin": [], "thick": []}
    for g in labels:
        cut = cuts(rng, g, num_cuts, extra=(1.0, 1.0))
        n = int(cut.sum())
        flips = [cut, harmless(rng, g, n, "thin"), harmless(rng, g, n, "thick")]
        with torch.no_grad():
            # a 2D extractor scores a volume by all its slices along the three axes
            pred = torch.cat([_tensor(g ^ f) for f in flips])
            d = topology_loss(pred, _tensor(g).repeat(3, *[1] * (g.ndim + 1)), extractor, num_slices=None)[:, 0]
        per_pixel = [(d[i] / max(int(f.sum()), 1)).item() for i, f in enumerate(flips)]
        ratios["thin"].append(per_pixel[0] / per_pixel[1])
        ratios["thick"].append(per_pixel[0] / per_pixel[2])
    return {k: statistics.median(v) for k, v in ratios.items()}


def soft_with_cuts(rng: np.random.Generator, g: np.ndarray, num_cuts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A soft imperfect prediction: the label with cuts and with border thinning and thickening of as many pixels
    as the cuts each, blurred (sigma 1), in [0.05, 0.95]; also the cut and the harmless-noise pixels."""
    cut = cuts(rng, g, num_cuts, extra=(1.0, 3.0))
    n = int(cut.sum())
    noise = harmless(rng, g & ~cut, n, "thin") | harmless(rng, g, n, "thick")
    x = ((g & ~cut) ^ noise).astype(np.float32)
    return 0.05 + 0.9 * ndimage.gaussian_filter(x, 1.0), cut, noise


def gradient_steps(extractor, p: torch.Tensor, g: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``steps`` max-normalised gradient steps of the term alone on the logits of ``p``; returns the new p."""
    z = torch.logit(p).requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(feature_distance(extractor, torch.sigmoid(z), g).sum(), z)
        scale = grad.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, *[1] * (grad.ndim - 1))
        z = (z - lr * grad / scale).detach().requires_grad_(True)
    return torch.sigmoid(z).detach()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def gradient_test(extractor, labels, num_cuts: int, steps: int = 10, lr: float = 1.0, seed: int = 0) -> dict:
    """Means over labels, for ``p > 0.5`` before and after the gradient steps: Betti error (sum over k), Dice, and
    the fraction of the cut pixels and of the harmless-noise pixels that the steps set right."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in labels:
        p0, cut, noise = soft_with_cuts(rng, g, num_cuts)
        p0 = _tensor(p0)
        p1 = gradient_steps(extractor, p0, _tensor(g), steps, lr)
        z = torch.logit(p0).requires_grad_(True)
        (grad,) = torch.autograd.grad(feature_distance(extractor, torch.sigmoid(z), _tensor(g)).sum(), z)
        grad = grad[0, 0].abs().numpy()
        m0, m1 = p0[0, 0].numpy() > 0.5, p1[0, 0].numpy() > 0.5
        rows.append(
            {
                "betti_before": float(betti_number_error(m0, g).sum()),
                "betti_after": float(betti_number_error(m1, g).sum()),
                "dice_before": _dice(m0, g),
                "dice_after": _dice(m1, g),
                "cuts_fixed": np.count_nonzero(cut & m1) / max(np.count_nonzero(cut), 1),
                "noise_fixed": np.count_nonzero(noise & (m1 == g)) / max(np.count_nonzero(noise), 1),
                "selectivity": float(grad[cut].mean() / max(grad[noise].mean(), 1e-30)),
            }
        )
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]}


def pixel_features(x: torch.Tensor) -> list[torch.Tensor]:
    """Identity features: the term becomes the pixel L2 loss, the reference a topology prior must beat."""
    return [x]


def euler_density(x: torch.Tensor) -> torch.Tensor:
    """Expected Euler characteristic of the union of closed pixels (voxels), each present with probability ``x``
    independently, per cell of the grid of pixel corners: ``sum over cells of (-1)^dim P(cell present)``, a cell
    being present when any of the 2^k pixels around it is. Its sum over a binary mask is the mask's Euler
    characteristic at full connectivity (``beta0 - beta1`` in 2D), the quantity that cuts and bridges change and
    topology-preserving noise does not."""
    n = x.ndim - 2
    absent_outside = F.pad(1 - x, (1, 1) * n, value=1.0)
    chi = 0
    for k in range(n + 1):  # cells between the pixels along k axes: dimension n - k, 2^k pixels around each
        for axes in itertools.combinations(range(2, n + 2), k):
            absent = absent_outside
            for d in range(2, n + 2):
                m = absent.shape[d]
                if d in axes:  # between pixels i and i + 1 along d: absent when both are
                    absent = absent.narrow(d, 0, m - 1) * absent.narrow(d, 1, m - 1)
                else:
                    absent = absent.narrow(d, 1, m - 2)
            pad = [p for d in reversed(range(2, n + 2)) for p in ((0, 0) if d in axes else (0, 1))]
            chi = chi + (-1) ** (n - k) * F.pad(1 - absent, pad)
    return chi


def euler_features(x: torch.Tensor, window: int = EULER_WINDOW) -> list[torch.Tensor]:
    """The local Euler characteristic: :func:`euler_density` summed over ``window``-wide windows at half-window
    stride. An exact topological measurement without weights, the reference for what the property test asks."""
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return [pool(euler_density(x), window, stride=window // 2) * window ** (x.ndim - 2)]


def extractors(dims: int, weights="shipped") -> dict:
    return {
        "MaskFeatures": MaskFeatures(dims, weights),
        "random VGG-19": VGG19Features(weights=None),
        "pixel L2": pixel_features,
        f"local Euler characteristic ({EULER_WINDOW} px windows)": euler_features,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isbi", type=Path, default=DEFAULT_ISBI)
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 3], choices=(2, 3))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default="shipped", help="MaskFeatures weights: 'shipped' or a path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| dims | extractor | cuts / thinning | cuts / thickening | Betti err before | after | Dice before | after "
        "| cut px fixed | noise px fixed | first-step grad cut / noise |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dims in args.dims:
        labels = heldout_crops_2d(args.isbi) if dims == 2 else heldout_volumes_3d()
        num_cuts = 25 if dims == 2 else 6
        for name, ext in extractors(dims, args.weights).items():
            r = property_ratios(ext, labels, num_cuts)
            if dims == 3:  # the gradient test is 2D
                print(f"| 3D | {name} | {r['thin']:.2f}x | {r['thick']:.2f}x | - | - | - | - | - | - | - |", flush=True)
                continue
            gt = gradient_test(ext, [c[64:192, 64:192] for c in labels[::6]], 4, steps=args.steps)
            print(
                f"| {dims}D | {name} | {r['thin']:.2f}x | {r['thick']:.2f}x | {gt['betti_before']:.1f} | "
                f"{gt['betti_after']:.1f} | {gt['dice_before']:.3f} | {gt['dice_after']:.3f} | "
                f"{gt['cuts_fixed']:.0%} | {gt['noise_fixed']:.0%} | {gt['selectivity']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
