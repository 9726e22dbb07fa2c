"""A one-minute demo: a small MONAI UNet learns EM membranes with a segloss loss, printing the loss as it falls.

    python -m segloss.demo [--data ../shared/data/isbi2012_em] [--seconds 60] [--device cpu]

Data: the ISBI-2012 EM training stack (PNG sections; label 0 = membrane, so the membrane mask is
``label == 0``), split by contiguous sections: 00-23 train, 24-29 validate. When the folder is absent, a
deterministic synthetic stand-in from :mod:`segloss.data.synthetic` is used. Loss: ``segloss.DiceCELoss`` on an
integer label map plus the U-Net border weight map on the CE term.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_DATA = Path("../shared/data/isbi2012_em")


def load_isbi(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N,1,H,W) float32 images in [0,1] and (N,1,H,W) uint8 membrane masks (1 = membrane)."""
    from PIL import Image

    names = sorted(p.name for p in (folder / "images").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no PNG sections in {folder / 'images'}")
    images, labels = [], []
    for name in names:
        label_path = folder / "labels" / name
        if not label_path.is_file():
            raise FileNotFoundError(f"label file missing for section {name}: {label_path}")
        images.append(np.asarray(Image.open(folder / "images" / name).convert("L"), dtype=np.float32) / 255.0)
        labels.append((np.asarray(Image.open(label_path).convert("L")) == 0).astype(np.uint8))
    return np.stack(images)[:, None], np.stack(labels)[:, None]


def random_crops(images, labels, weights, size, batch, rng):
    n, _, h, w = images.shape
    idx = rng.integers(0, n, batch)
    ys, xs = rng.integers(0, h - size + 1, batch), rng.integers(0, w - size + 1, batch)
    crop = lambda a: np.stack([a[i, :, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs)])  # noqa: E731
    return crop(images), crop(labels), crop(weights)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISBI-2012 folder (images/, labels/)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training budget")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from monai.networks.nets import UNet

    import segloss
    from segloss.transforms import BorderWeightMap

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if (args.data / "images").is_dir():
        images, labels = load_isbi(args.data)
        source = f"ISBI-2012 EM sections from {args.data}"
    else:
        from segloss.data.synthetic import membrane_2d

        images, labels = membrane_2d(30, size=256, seed=args.seed)
        source = f"synthetic membranes ({args.data} not found)"
    train, val = slice(0, 24), slice(24, None)
    # U-Net border weights computed on the cells (connected components of the non-membrane region)
    border = BorderWeightMap(object_labels=[0])
    weights = np.stack([np.asarray(border(lab)) for lab in labels]).astype(np.float32)
    print(f"data: {source}: {len(images)} sections {images.shape[-2:]}, membrane fraction {labels.mean():.2f}")

    device = torch.device(args.device)
    net = UNet(2, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1).to(device)
    loss_fn = segloss.DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 2e-3)

    start, step, last_print, running = time.perf_counter(), 0, 0.0, []
    while time.perf_counter() - start < args.seconds:
        x, y, w = (
            torch.from_numpy(a).to(device)
            for a in random_crops(images[train], labels[train], weights[train], args.crop, args.batch, rng)
        )
        loss = loss_fn(net(x), y.long(), weight_map=w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running.append(loss.item())
        elapsed = time.perf_counter() - start
        if elapsed - last_print >= 5 or step == 1:
            print(f"[{elapsed:5.1f}s] step {step:4d}  loss {np.mean(running):.4f}", flush=True)
            running, last_print = [], elapsed

    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(images[val]).to(device)
        pred = net(x).argmax(1, keepdim=True).cpu().numpy()
    truth = labels[val]
    dice = 2 * np.sum(pred * truth) / max(np.sum(pred) + np.sum(truth), 1)
    print(f"validation sections {val.start}-{len(images) - 1}: membrane Dice {dice:.3f} after {step} steps")


if __name__ == "__main__":
    main()
