"""Loss study: which loss keeps EM membranes connected, at what cost per step.

Trains the 2D EM bundle's network (``network_def`` of ``bundles/em_membrane_2d/configs/train.json``) once per
(loss, seed) at an equal budget on ISBI 2012 sections 00-23 and scores the last model on whole sections 24-29
(512^2): Dice and clDice of the membrane, Betti-0 / Betti-1 errors (per section, averaged), completeness /
correctness / quality (2 px tolerance), the median seconds per training step and the peak memory rise.

Runs are paired: seed ``s`` gives every loss the same initial weights and the same patches in the same order,
so per-seed differences between losses are differences of the loss alone.

Every (loss, seed) runs in its own subprocess and writes ``<results>/rows/<loss>_s<seed>.json`` atomically; a
finished run is never trained again, so an interrupted study resumes where it stopped. The CSV (one row per
(loss, seed)), the Markdown table of means and spreads (also written into ``docs/loss_study.md`` between its
``<!-- table:BUDGET -->`` markers) and the figures are rebuilt from those files.

    python benchmarks/loss_study.py --budget cpu               # train what is missing, then report
    python benchmarks/loss_study.py --budget cpu --workers 2   # two runs at a time (one thread each)
    python benchmarks/loss_study.py --budget cpu --report      # tables and figures only
    python benchmarks/loss_study.py --budget cpu --timing      # step time of every loss vs CE, one process

Budgets: ``cpu`` (3000 steps of 4 x 96^2 patches, cosine learning rate, ~3-5 min a run on one core without the
VGG term), ``gpu`` (the bundle's full recipe, see ``BUDGETS``) and ``quick`` (800 steps, one seed: the README's
side-by-side of CE and the winning loss, written under ``benchmarks/results/loss_study_quick/`` only). ``--data`` points at an ISBI 2012 folder
(``images/NN.png``, ``labels/NN.png``, label 0 = membrane); it defaults to ``../shared/data/isbi2012_em``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isbi2012_em"
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "loss_study.md"
FIGURES = REPO / "docs" / "figures"
# fold -> (training sections, validation sections, the section of the overlay figure). Fold 0 is the bundle's split;
# fold 1 validates on sections the fold-0 models trained on, a second look at whether a ranking holds.
FOLDS = {0: (range(0, 24), range(24, 30), 27), 1: (range(6, 30), range(0, 6), 2)}

# budgets whose tables and figures go into docs/ (the others stay in their results folder)
PUBLISHED = ("cpu", "gpu")
BUDGETS = {
    # steps, patch edge, patches per step, Adam learning rate (cosine to 0), evaluations on the way, seeds
    "cpu": {"steps": 3000, "patch": 96, "batch": 4, "lr": 1e-3, "evals": 6, "seeds": [0, 1, 2], "threads": 1},
    # the bundle's full recipe in patches: 200 epochs x 24 sections x 4 patches of 256^2 = 19,200 patches, here
    # 2400 steps of 8 (13x the pixels of the cpu budget); AMP on CUDA. Estimate, not measured here: ~10-20 ms a
    # step for the UNet on an H100, i.e. 1-2 min a run, ~5x that with the VGG-19 term.
    "gpu": {"steps": 2400, "patch": 256, "batch": 8, "lr": 1e-3, "evals": 8, "seeds": [0, 1, 2], "threads": 8},
    # the README's main job: one seed of CE against the winning loss in a couple of minutes, written under
    # benchmarks/results/loss_study_quick/ only (not into docs/)
    "quick": {"steps": 800, "patch": 96, "batch": 4, "lr": 1e-3, "evals": 4, "seeds": [0], "threads": 1},
    # for the tests
    "tiny": {"steps": 3, "patch": 64, "batch": 2, "lr": 1e-3, "evals": 1, "seeds": [0], "threads": 1},
}


# ---------------------------------------------------------------------------------------------------- losses


class SoftclDice(nn.Module):
    """DiceCE + MONAI's ``SoftclDiceLoss`` (the peer's topology term), one weight each."""

    def __init__(self) -> None:
        super().__init__()
        import monai.losses

        import segloss

        self.dice_ce = segloss.DiceCELoss(to_onehot_y=True, softmax=True)
        self.cldice = monai.losses.SoftclDiceLoss(include_background=False, to_onehot_y=True, softmax=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_ce(input, target) + self.cldice(input, target.float())


def _border_ce_dice(extra: dict | None = None):
    """Border-weighted CE + Dice (the bundle's pixel loss), plus optional extra terms ``name -> (loss, weight)``."""
    import segloss

    losses = {"ce": segloss.WeightedCrossEntropyLoss(), "dice": membrane_dice()}
    weights = {"ce": 1.0, "dice": 1.0}
    for name, (loss, w) in (extra or {}).items():
        losses[name], weights[name] = loss, w
    return segloss.CompoundLoss(losses, weights, term_kwargs={name: [] for name in losses if name != "ce"})


def membrane_dice():
    """Dice of the membrane channel only (background left out), as the bundle's ``dice`` option."""
    import segloss

    return segloss.DiceLoss(include_background=False, to_onehot_y=True, softmax=True)


def _vgg_random(ctx):
    import segloss

    return segloss.TopologyLoss(softmax=True, to_onehot_y=True, weights=None)


def _mask_features(ctx):
    import segloss

    return segloss.TopologyLoss(softmax=True, to_onehot_y=True, weights="auto")


def _topology_after_warmup(mu: float):
    """The term-weight schedule that switches the ``topology`` term on, at ``mu``, after a third of the steps."""
    return lambda steps: {"topology": [(0, 0.0), (steps // 3, mu)]}


def _mask_features_after_warmup(mu: float):
    """Border CE + Dice, plus ``mu`` x the MaskFeatures term from a third of the steps on: the issue's mu /
    warm-up sweep, after 0.1 from step 0 raised the Betti error (the term then acts on a network that has not
    yet found the membranes)."""
    return (
        lambda ctx: _border_ce_dice({"topology": (_mask_features(ctx), mu)}),
        ["weight_map"],
        _topology_after_warmup(mu),
    )


def _dice_topology(extractor, mu: float, warmup: bool):
    """Plain membrane Dice (the 2D bundle's default loss) plus ``mu`` x a topology term (``extractor(ctx)``),
    from step 0 or (``warmup``) from a third of the steps on: the issue's comparison of the term against the
    same loss without it and with random VGG-19 features, on the loss that won the study."""
    import segloss

    def build(ctx):
        return segloss.CompoundLoss({"dice": membrane_dice(), "topology": extractor(ctx)}, {"topology": mu})

    return build, [], _topology_after_warmup(mu) if warmup else None


# name -> (builder(ctx) -> loss module, the batch keys its forward takes, a term-weight schedule or None).
# ctx holds "class_weight" (balanced weights of the training labels) and "steps".
LOSSES = {
    "ce": (lambda ctx: __import__("segloss").WeightedCrossEntropyLoss(), [], None),
    "class_weighted_ce": (
        lambda ctx: __import__("segloss").WeightedCrossEntropyLoss(class_weight=ctx["class_weight"]),
        [],
        None,
    ),
    "border_ce": (lambda ctx: __import__("segloss").WeightedCrossEntropyLoss(), ["weight_map"], None),
    "dice": (lambda ctx: membrane_dice(), [], None),
    "dice_ce": (lambda ctx: __import__("segloss").DiceCELoss(to_onehot_y=True, softmax=True), [], None),
    "focal": (lambda ctx: __import__("segloss").FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0), [], None),
    "tversky": (
        lambda ctx: __import__("segloss").TverskyLoss(
            include_background=False, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7
        ),
        [],
        None,
    ),
    "focal_tversky": (
        lambda ctx: __import__("segloss").FocalTverskyLoss(
            include_background=False, to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7
        ),
        [],
        None,
    ),
    # Berman et al.: cross-entropy first, Lovász-Softmax for the last third
    "ce_then_lovasz": (
        lambda ctx: __import__("segloss").CompoundLoss(
            {
                "ce": __import__("segloss").WeightedCrossEntropyLoss(),
                "lovasz": __import__("segloss").LovaszSoftmaxLoss(to_onehot_y=True, softmax=True, per_image=True),
            }
        ),
        [],
        lambda steps: {"ce": [(0, 1.0), (2 * steps // 3, 0.0)], "lovasz": [(0, 0.0), (2 * steps // 3, 1.0)]},
    ),
    "dice_ce_skeleton_recall": (
        lambda ctx: __import__("segloss").CompoundLoss(
            {
                "dice_ce": __import__("segloss").DiceCELoss(to_onehot_y=True, softmax=True),
                "skeleton_recall": __import__("segloss").SkeletonRecallLoss(to_onehot_y=True, softmax=True),
            },
            term_kwargs={"dice_ce": [], "skeleton_recall": ["skeleton"]},
        ),
        ["skeleton"],
        None,
    ),
    "dice_ce_soft_cldice": (lambda ctx: SoftclDice(), [], None),
    "border_ce_dice": (lambda ctx: _border_ce_dice(), ["weight_map"], None),
    # the bundle's former default: border CE + Dice + 0.1 x VGG-19 term (random features: no ImageNet here)
    "border_ce_dice_vgg_random": (
        lambda ctx: _border_ce_dice({"topology": (_vgg_random(ctx), 0.1)}),
        ["weight_map"],
        None,
    ),
    # border CE + Dice + 0.1 x the shipped mask-domain prior (weights="auto" without ImageNet on disk)
    "border_ce_dice_mask_features": (
        lambda ctx: _border_ce_dice({"topology": (_mask_features(ctx), 0.1)}),
        ["weight_map"],
        None,
    ),
    "border_ce_dice_mask_features_0.03_warmup": _mask_features_after_warmup(0.03),
    "border_ce_dice_mask_features_0.01_warmup": _mask_features_after_warmup(0.01),
    "dice_mask_features": _dice_topology(_mask_features, 0.1, warmup=False),
    "dice_mask_features_0.01_warmup": _dice_topology(_mask_features, 0.01, warmup=True),
    "dice_vgg_random_0.01_warmup": _dice_topology(_vgg_random, 0.01, warmup=True),
}
# the order in which runs are trained: cheap, decisive comparisons first, the expensive VGG term last
ORDER = [
    "ce",
    "border_ce_dice",
    "dice_ce_skeleton_recall",
    "dice_ce",
    "dice",
    "border_ce",
    "class_weighted_ce",
    "focal",
    "tversky",
    "focal_tversky",
    "ce_then_lovasz",
    "dice_ce_soft_cldice",
    "border_ce_dice_mask_features",
    "border_ce_dice_mask_features_0.03_warmup",
    "border_ce_dice_mask_features_0.01_warmup",
    "dice_mask_features",
    "dice_mask_features_0.01_warmup",
    "border_ce_dice_vgg_random",
    "dice_vgg_random_0.01_warmup",
]
assert sorted(ORDER) == sorted(LOSSES)


# ---------------------------------------------------------------------------------------------------- data


def load_sections(data: Path, sections) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` float32 in [0, 1] and membrane masks ``(N, H, W)`` uint8 (1 = membrane)."""
    from skimage.io import imread

    images, labels = [], []
    for i in sections:
        for folder, out in (("images", images), ("labels", labels)):
            path = data / folder / f"{i:02d}.png"
            if not path.is_file():
                raise FileNotFoundError(
                    f"ISBI 2012 file not found: {path}. Point --data at a folder with images/NN.png and labels/NN.png "
                    "(segloss.data.download_isbi2012 fetches them)."
                )
            out.append(imread(path))
    return np.stack(images).astype(np.float32) / 255.0, (np.stack(labels) == 0).astype(np.uint8)


def training_maps(labels: np.ndarray, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """U-Net border weight maps (w0 = 10, sigma = 5, cells as objects) and 1-px tubed skeletons, cached on disk."""
    from segloss.transforms.array import border_weight_map, label_skeleton

    key = cache / f"maps_{labels.shape[0]}x{labels.shape[1]}x{labels.shape[2]}_{int(labels.sum())}.npz"
    if key.is_file():
        with np.load(key) as z:
            return z["weight"], z["skeleton"]
    weight = np.stack([border_weight_map(m, w0=10.0, sigma=5.0, object_labels=[0]) for m in labels])
    skeleton = np.stack([label_skeleton(m, dilation=1) for m in labels])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = key.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, weight=weight, skeleton=skeleton)
    os.replace(tmp, key)
    return weight, skeleton


class PatchSampler:
    """Random patches with flips, 90-degree rotations and a +-10 % intensity scale; fixed by the seed."""

    def __init__(self, images, labels, weight, skeleton, patch: int, batch: int, seed: int) -> None:
        self.arrays = np.stack([images, labels, weight, skeleton], axis=1).astype(np.float32)  # (N, 4, H, W)
        self.patch, self.batch = patch, batch
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> dict[str, torch.Tensor]:
        n, _, h, w = self.arrays.shape
        out = []
        for _ in range(self.batch):
            i = self.rng.integers(n)
            y, x = self.rng.integers(h - self.patch + 1), self.rng.integers(w - self.patch + 1)
            a = self.arrays[i, :, y : y + self.patch, x : x + self.patch]
            if self.rng.random() < 0.5:
                a = a[:, ::-1]
            if self.rng.random() < 0.5:
                a = a[:, :, ::-1]
            a = np.rot90(a, self.rng.integers(4), axes=(1, 2)).copy()
            if self.rng.random() < 0.5:
                a[0] *= 1.0 + self.rng.uniform(-0.1, 0.1)
            out.append(a)
        b = torch.from_numpy(np.stack(out))
        return {
            "image": b[:, 0:1],
            "label": b[:, 1:2].long(),
            "weight_map": b[:, 2:3],
            "skeleton": b[:, 3:4].long(),
        }


# ---------------------------------------------------------------------------------------------------- model


def bundle_network() -> nn.Module:
    """The 2D EM bundle's network, built from its config's ``network_def``."""
    from monai.networks.nets import UNet

    config = json.loads((REPO / "bundles" / "em_membrane_2d" / "configs" / "train.json").read_text())
    net_def = dict(config["network_def"])
    if net_def.pop("_target_") != "UNet":
        raise ValueError("the study builds the bundle's MONAI UNet; the bundle's network_def names another network.")
    return UNet(**net_def)


@torch.no_grad()
def evaluate(net: nn.Module, images: np.ndarray, labels: np.ndarray, device) -> tuple[dict, np.ndarray]:
    """Mean metrics over whole sections and the predicted membrane masks ``(N, H, W)`` bool."""
    from segloss.metrics import betti_number_error, cldice, delineation_scores

    net.eval()
    preds = []
    for img in images:
        logits = net(torch.from_numpy(img)[None, None].to(device))
        preds.append((logits.argmax(1)[0] == 1).cpu().numpy())
    net.train()
    rows = []
    for pred, lab in zip(preds, labels.astype(bool)):
        b0, b1 = betti_number_error(pred, lab)
        comp, corr, qual = delineation_scores(pred, lab, tolerance=2.0)
        dice = 2 * np.count_nonzero(pred & lab) / max(np.count_nonzero(pred) + np.count_nonzero(lab), 1)
        rows.append([dice, cldice(pred, lab), b0, b1, b0 + b1, comp, corr, qual])
    mean = np.mean(np.array(rows, dtype=np.float64), axis=0)
    names = ["dice", "cldice", "betti0", "betti1", "betti", "completeness", "correctness", "quality"]
    return dict(zip(names, map(float, mean))), np.stack(preds)


# ---------------------------------------------------------------------------------------------------- one run


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def train_one(loss_name: str, seed: int, budget: str, data: Path, results: Path, fold: int = 0) -> dict:
    """Train one (loss, seed), write its JSON and the overlay section's prediction; return the row."""
    from segloss.losses import TermWeightSchedule
    from segloss.transforms.array import balanced_class_weights

    cfg = BUDGETS[budget]
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_sections, val_sections, overlay = FOLDS[fold]
    images, labels = load_sections(data, train_sections)
    weight, skeleton = training_maps(labels, results / "cache")
    val_images, val_labels = load_sections(data, val_sections)
    ctx = {"class_weight": balanced_class_weights(np.bincount(labels.ravel(), minlength=2)).tolist()}
    build, keys, schedule = LOSSES[loss_name]

    # the code (and shipped weights) the run starts with; a row written later must not claim a newer commit
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    commit = commit.strip()
    torch.manual_seed(seed)
    net = bundle_network().to(device)
    loss_fn = build(ctx).to(device)
    schedule = TermWeightSchedule(schedule(cfg["steps"]), mode="step") if schedule else None
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["steps"])
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    sampler = PatchSampler(images, labels, weight, skeleton, cfg["patch"], cfg["batch"], seed)
    eval_at = {round(cfg["steps"] * (k + 1) / cfg["evals"]) for k in range(cfg["evals"])}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = _peak_mb(device) if device.type == "cpu" else 0.0
    step_s, curve, diverged = [], [], False
    start = time.perf_counter()
    for step in range(cfg["steps"]):
        batch = {k: v.to(device) for k, v in sampler().items()}
        if schedule is not None:
            schedule.apply(loss_fn, step)
        t0 = time.perf_counter()
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = net(batch["image"])
        loss = loss_fn(logits.float(), batch["label"], **{k: batch[k] for k in keys})
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            diverged = True
            break
        if step + 1 in eval_at:
            metrics, _ = evaluate(net, val_images, val_labels, device)
            curve.append({"step": step + 1, "loss": float(loss.item()), **metrics})
    metrics, preds = evaluate(net, val_images, val_labels, device)
    row = {
        "loss": loss_name,
        "seed": seed,
        "fold": fold,
        **metrics,
        "step_s": statistics.median(step_s),
        "peak_mb": _peak_mb(device) - base_mb,
        "train_s": time.perf_counter() - start,
        "budget": budget,
        "steps": len(step_s),
        "diverged": diverged,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit,
        "curve": curve,
    }
    from skimage.io import imsave

    pred_png = results / "predictions" / f"{loss_name}_s{seed}_section{overlay}.png"
    pred_png.parent.mkdir(parents=True, exist_ok=True)
    imsave(pred_png, (preds[list(val_sections).index(overlay)] * 255).astype(np.uint8), check_contrast=False)
    _write_atomic(results / "rows" / f"{loss_name}_s{seed}.json", json.dumps(row, indent=1))
    return row


# ---------------------------------------------------------------------------------------------------- timing


def time_steps(budget: str, losses, repeats: int = 5, steps: int = 10) -> dict[str, float]:
    """Median seconds per training step of each loss, in one process, round-robin over ``repeats`` rounds."""
    from segloss.losses import CompoundLoss

    cfg = BUDGETS[budget]
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    p, b = cfg["patch"], cfg["batch"]
    labels = (rng.random((b, 1, p, p)) < 0.2).astype(np.int64)
    batch = {
        "image": torch.rand(b, 1, p, p),
        "label": torch.from_numpy(labels),
        "weight_map": torch.rand(b, 1, p, p) + 1,
        "skeleton": torch.from_numpy(labels),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    nets = {}
    for name in losses:
        torch.manual_seed(0)
        net = bundle_network().to(device)
        loss_fn = LOSSES[name][0]({"class_weight": [0.6, 2.3]}).to(device)
        if isinstance(loss_fn, CompoundLoss) and LOSSES[name][2] is not None:
            for term in loss_fn.weights:  # a scheduled loss costs its most expensive phase: every term on
                loss_fn.set_weight(term, 1.0)
        nets[name] = (net, loss_fn, torch.optim.Adam(net.parameters(), 1e-3))

    def step(name):
        net, loss_fn, opt = nets[name]
        loss = loss_fn(net(batch["image"]), batch["label"], **{k: batch[k] for k in LOSSES[name][1]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in losses}
    for name in losses:
        step(name)  # warm-up
    for _ in range(repeats):
        for name in losses:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------- report

METRICS = ["dice", "cldice", "betti0", "betti1", "betti", "completeness", "correctness", "quality", "step_s", "peak_mb"]
SCORES = ("dice", "cldice", "completeness", "correctness", "quality")  # in [0, 1]: three decimals


def read_runs(results: Path, order=ORDER) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted((results / "rows").glob("*.json"))]
    return sorted(rows, key=lambda r: (order.index(r["loss"]) if r["loss"] in order else 99, r["seed"]))


def write_csv(rows: list[dict], path: Path, metrics=METRICS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["loss", "seed", *metrics, "steps", "diverged", "device"])
        for r in rows:
            writer.writerow(
                [r["loss"], r["seed"], *(f"{r[m]:.6g}" for m in metrics), r["steps"], r["diverged"], r["device"]]
            )


def _mean_sd(values) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summary_table(rows: list[dict], timing: dict[str, float] | None, order=ORDER, columns=None) -> str:
    """Markdown: per loss, mean +- sample sd over seeds of each column, and the per-seed (paired) Betti change
    against CE. ``columns`` maps metric -> header (default: the 2D study's)."""
    columns = columns or {
        "dice": "Dice",
        "cldice": "clDice",
        "betti0": "Betti-0 err",
        "betti1": "Betti-1 err",
        "betti": "Betti err",
    }
    by_loss: dict[str, list[dict]] = {}
    for r in rows:
        by_loss.setdefault(r["loss"], []).append(r)
    ce = {r["seed"]: r for r in by_loss.get("ce", [])}
    delineation = all("quality" in r for r in rows)
    heads = ["loss", "seeds", *columns.values(), "Betti err vs CE (paired)"]
    heads += ["compl. / corr. / quality"] * delineation + ["step time vs CE", "peak MB"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name in [n for n in order if n in by_loss]:
        rs = by_loss[name]
        cells = [name + (" (diverged)" if any(r["diverged"] for r in rs) else ""), str(len(rs))]
        for m in columns:
            mu, sd = _mean_sd([r[m] for r in rs])
            digits = 3 if m in SCORES else 1
            cells.append(f"{mu:.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{mu:.{digits}f}")
        paired = [r["betti"] / ce[r["seed"]]["betti"] - 1 for r in rs if r["seed"] in ce and ce[r["seed"]]["betti"] > 0]
        if name == "ce" or not paired:
            cells.append("—")
        else:
            cells.append(f"{100 * statistics.mean(paired):+.0f} % ({', '.join(f'{100 * p:+.0f}' for p in paired)})")
        if delineation:
            cells.append(
                " / ".join(
                    f"{statistics.mean([r[m] for r in rs]):.3f}" for m in ("completeness", "correctness", "quality")
                )
            )
        cells.append(f"{timing[name] / timing['ce']:.2f}x" if timing and name in timing and "ce" in timing else "—")
        cells.append(f"{statistics.mean([r['peak_mb'] for r in rs]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_doc_table(budget: str, table: str, command: str, doc: Path = DOC) -> None:
    """Replace the block between ``<!-- table:BUDGET -->`` and ``<!-- /table:BUDGET -->`` in the study's page."""
    start, end = f"<!-- table:{budget} -->", f"<!-- /table:{budget} -->"
    block = f"{start}\n\nMade by `{command}`.\n\n{table}\n{end}"
    text = doc.read_text() if doc.is_file() else f"# Loss study\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _write_atomic(doc, head + block + rest.split(end, 1)[1])


def metric_bars(rows: list[dict], names: list[str], metrics: list[str], path: Path) -> Path:
    """One panel per metric: the mean over seeds of each loss as a bar, each seed as a dot (CE in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.35 * len(names) + 1.5), sharey=True)
    for ax, metric in zip(axes, metrics):
        for y, name in enumerate(names):
            vals = [r[metric] for r in rows if r["loss"] == name]
            ax.barh(y, np.mean(vals), color="tab:blue" if name != "ce" else "tab:gray", alpha=0.6)
            ax.plot(vals, [y] * len(vals), "k.", ms=5)
        ax.set_title(metric + (" error" if metric.startswith("betti") else ""))
        if not metric.startswith("betti"):  # overlap scores differ in the second decimal: zoom in
            low = min(r[metric] for r in rows)
            ax.set_xlim(max(0.0, low - 0.05), min(1.0, max(r[metric] for r in rows) + 0.02))
        ax.set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def validation_curves(rows: list[dict], names: list[str], betti_label: str, where: str, path: Path) -> Path:
    """Betti error and Dice on the validation data during training, mean over seeds, one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in names:
        curves = [r["curve"] for r in rows if r["loss"] == name and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [c["step"] for c in curves[0][:n]]
        for ax, metric in zip(axes, ["betti", "dice"]):
            ax.plot(steps, np.mean([[c[i][metric] for i in range(n)] for c in curves], axis=0), label=name, marker=".")
    axes[0].set_ylabel(f"{betti_label}, mean over seeds")
    axes[1].set_ylabel(f"Dice, {where}, mean over seeds")
    for ax in axes:
        ax.set_xlabel("training step")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(rows: list[dict], data: Path, fold: int, results: Path, figures: Path) -> list[Path]:
    """Metric bars with seed spread, validation curves, and one overlay per loss of the same section (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.io import imread

    figures.mkdir(parents=True, exist_ok=True)
    val_sections, overlay = FOLDS[fold][1:]
    names = [n for n in ORDER if any(r["loss"] == n for r in rows)]
    out = []

    out.append(
        metric_bars(rows, names, ["betti0", "betti1", "dice", "cldice"], figures / f"{results.name}_metrics.png")
    )

    where = f"sections {val_sections[0]:02d}-{val_sections[-1]:02d}"
    out.append(
        validation_curves(rows, names, f"Betti error (b0 + b1), {where}", where, figures / f"{results.name}_curves.png")
    )

    label = imread(data / "labels" / f"{overlay:02d}.png") == 0
    h, w = label.shape
    crop = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))  # the central quarter, big enough to see breaks
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4 * cols, 4 * math.ceil(len(names) / cols)))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, name in zip(np.ravel(axes), names):
        png = results / "predictions" / f"{name}_s0_section{overlay}.png"
        if not png.is_file():
            continue
        pred = imread(png) > 0
        rgb = np.ones((*label.shape, 3))
        rgb[pred & label] = (0.2, 0.2, 0.2)  # membrane found
        rgb[label & ~pred] = (0.9, 0.1, 0.1)  # membrane missed: breaks
        rgb[pred & ~label] = (0.1, 0.5, 0.9)  # false membrane: bridges, thickening
        ax.imshow(rgb[crop])
        r = next(r for r in rows if r["loss"] == name and r["seed"] == 0)
        ax.set_title(f"{name}\nBetti err {r['betti']:.0f}, Dice {r['dice']:.3f}", fontsize=9)
    fig.suptitle(f"section {overlay}, seed 0: black found, red missed (breaks), blue false membrane")
    fig.tight_layout()
    out.append(figures / f"{results.name}_overlays.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)
    return out


def results_dir(budget: str, fold: int) -> Path:
    return RESULTS / (f"loss_study_{budget}" + (f"_fold{fold}" if fold else ""))


# ---------------------------------------------------------------------------------------------------- main


def pending(results: Path, losses, seeds) -> list[tuple[str, int]]:
    return [(n, s) for n in losses for s in seeds if not (results / "rows" / f"{n}_s{s}.json").is_file()]


def run_all(todo, worker_argv, workers: int, results: Path, threads: int) -> None:
    """Train the missing runs, ``workers`` subprocesses at a time (each an independent, resumable run).

    ``worker_argv(name, seed)`` is the command line of one run; its output goes to ``<results>/logs/``.
    """
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    todo = list(todo)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    (results / "logs").mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < workers:
            name, seed = todo.pop(0)
            log = open(results / "logs" / f"{name}_s{seed}.log", "w")
            proc = subprocess.Popen(worker_argv(name, seed), stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, name, seed, time.time()))
            print(f"started {name} seed {seed}", flush=True)
        time.sleep(2)
        for item in list(running):
            proc, name, seed, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                status = (
                    "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see logs/{name}_s{seed}.log)"
                )
                print(f"{status}: {name} seed {seed} in {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--results", type=Path, default=None, help="results folder (default benchmarks/results/loss_study_BUDGET)"
    )
    parser.add_argument("--fold", type=int, choices=sorted(FOLDS), default=0, help="0: validate on 24-29 (default)")
    parser.add_argument("--losses", nargs="+", default=None, choices=sorted(LOSSES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only rebuild the CSV, tables and figures")
    parser.add_argument("--timing", action="store_true", help="measure step time of every loss vs CE, one process")
    parser.add_argument("--run", nargs=2, metavar=("LOSS", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--doc", type=Path, default=None, help="page to write the table into (default: see PUBLISHED)")
    parser.add_argument("--figures", type=Path, default=None)
    args = parser.parse_args(argv)
    results = args.results or results_dir(args.budget, args.fold)
    published = args.budget in PUBLISHED
    args.doc = args.doc or (DOC if published else results / "table.md")
    args.figures = args.figures or (FIGURES if published else results)
    losses = args.losses or ORDER
    if args.run:
        train_one(args.run[0], int(args.run[1]), args.budget, args.data, results, args.fold)
        return
    if not (args.data / "images").is_dir():
        raise SystemExit(f"no ISBI 2012 data at {args.data} (images/, labels/); pass --data.")
    (results / "logs").mkdir(parents=True, exist_ok=True)
    if args.timing:
        timing = time_steps(args.budget, losses)
        _write_atomic(
            results / "timing.json",
            json.dumps(
                {**timing, "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))}, indent=1
            ),
        )
        for name, s in timing.items():
            print(f"{name:32s} {1000 * s:8.1f} ms  {s / timing.get('ce', s):.2f}x CE")
        return
    if not args.report:
        load_sections(args.data, range(30))  # fail now, not in every worker
        training_maps(load_sections(args.data, FOLDS[args.fold][0])[1], results / "cache")  # once, before the workers

        def worker_argv(name, seed):
            return [
                sys.executable,
                __file__,
                "--budget",
                args.budget,
                "--data",
                str(args.data),
                "--results",
                str(results),
                "--fold",
                str(args.fold),
                "--run",
                name,
                str(seed),
            ]

        todo = pending(results, losses, args.seeds or BUDGETS[args.budget]["seeds"])
        run_all(todo, worker_argv, args.workers, results, BUDGETS[args.budget]["threads"])
    rows = read_runs(results)
    if not rows:
        raise SystemExit(f"no finished runs in {results / 'rows'}")
    write_csv(rows, results.parent / f"{results.name}.csv")
    timing_file = results / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else None
    table = summary_table(rows, timing)
    command = f"python benchmarks/loss_study.py --budget {args.budget}" + (f" --fold {args.fold}" if args.fold else "")
    write_doc_table(results.name.removeprefix("loss_study_"), table, command, args.doc)
    figures = plot(rows, args.data, args.fold, results, args.figures)
    print(table)
    print("figures:", *map(str, figures))


if __name__ == "__main__":
    main()
