"""The main job's report: metrics printed as a table, a figure (loss curves + a prediction overlay), a JSON summary.

Used at the end of ``bundles/em_membrane_2d/configs/quick.json`` (see that bundle's docs/README.md)::

    segloss.figures.report_run(trainer, evaluator, metric_logger, timer, output_dir)

The figure is drawn with matplotlib's non-interactive Agg backend, so it works on a headless machine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["overlay_rgb", "report_run", "training_figure"]

logger = logging.getLogger(__name__)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _mask(x: Any) -> np.ndarray:
    """A 2D foreground mask from ``(H, W)``, ``(1, H, W)`` labels or ``(C, H, W)`` one-hot (channel 1 = fg)."""
    a = _as_numpy(x)
    if a.ndim == 3:
        a = a[1] if a.shape[0] > 1 else a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2D map, (1, H, W) or (C, H, W), got shape {a.shape}.")
    return a > 0.5


def overlay_rgb(image: Any, label: Any, pred: Any) -> np.ndarray:
    """``(H, W, 3)`` float RGB: the grey image with true positives green, false positives red, false negatives blue.

    Args:
        image: ``(H, W)`` or ``(1, H, W)``, any range (min-max scaled for display).
        label, pred: foreground masks (see :func:`_mask`: label maps or 2-channel one-hot).
    """
    img = _as_numpy(image)
    img = img[0] if img.ndim == 3 else img
    lo, hi = float(img.min()), float(img.max())
    grey = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    gt, pr = _mask(label), _mask(pred)
    if gt.shape != grey.shape or pr.shape != grey.shape:
        raise ValueError(f"image {grey.shape}, label {gt.shape} and pred {pr.shape} must have the same shape.")
    rgb = np.repeat(grey[..., None], 3, axis=-1) * 0.6
    for mask, colour in ((gt & pr, (0.1, 0.9, 0.1)), (pr & ~gt, (0.95, 0.1, 0.1)), (gt & ~pr, (0.2, 0.4, 1.0))):
        rgb[mask] = colour
    return rgb


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def training_figure(
    path: str | Path,
    loss: Sequence[tuple[int, float]],
    metrics: Mapping[str, Sequence[tuple[int, float]]],
    sample: Mapping[str, Any] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG with the training loss, the validation metrics per validation, and a prediction overlay.

    Args:
        path: output PNG.
        loss: ``(iteration, loss)`` pairs (MONAI ``MetricLogger.loss``).
        metrics: name -> ``(iteration, value)`` pairs (``MetricLogger.metrics``).
        sample: a validation item with ``image``, ``label``, ``pred`` (see :func:`overlay_rgb`), or None.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if sample is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.6), constrained_layout=True)
    ax = axes[0]
    if loss:
        it, val = (np.asarray(v, dtype=float) for v in zip(*loss))
        ax.plot(it, val, color="0.75", lw=0.8, label="per iteration")
        window = max(1, len(val) // 20)
        if window > 1:
            ax.plot(it[window - 1 :], _smooth(val, window), color="C0", lw=1.8, label=f"mean of {window}")
        ax.legend(loc="upper right")
    ax.set(xlabel="iteration", ylabel="training loss", title="training loss")
    ax.grid(alpha=0.3)

    ax = axes[1]
    # scores in [0, 1] (Dice, clDice) on the left axis, counts (Betti error) on a right-hand axis of their own
    counts = None
    handles = []
    for k, (name, pairs) in enumerate(metrics.items()):
        if not pairs:
            continue
        it, val = (np.asarray(v, dtype=float) for v in zip(*pairs))
        target = ax
        if np.nanmax(np.abs(val)) > 1.0:
            counts = ax.twinx() if counts is None else counts
            target = counts
        handles += target.plot(it, val, marker="o", ms=3, color=f"C{k}", label=name)
    ax.set(xlabel="iteration", ylabel="score (0-1)", title="validation metrics")
    if counts is not None:
        counts.set_ylabel("count (right axis)")
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    ax.grid(alpha=0.3)

    if sample is not None:
        ax = axes[2]
        ax.imshow(overlay_rgb(sample["image"], sample["label"], sample["pred"]), interpolation="nearest")
        ax.set_title("validation: TP green, FP red, FN blue")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item()
    return float(value)


def report_run(
    trainer, evaluator, metric_logger, timer, output_dir: str | Path, title: str = "", info: Mapping | None = None
) -> dict:
    """Print and save the metrics of ``evaluator``'s last run, the training speed, and the figure.

    Call after training and a final ``evaluator.run()`` (its last batch gives the overlay).

    Args:
        trainer: the finished MONAI ``SupervisedTrainer``.
        evaluator: the ``SupervisedEvaluator`` that just ran (its ``state.metrics`` are reported).
        metric_logger: a MONAI ``MetricLogger`` attached to both (loss and metric histories).
        timer: an ignite ``Timer(average=True)`` timing the training iterations (seconds per iteration).
        output_dir: where ``summary.json`` and ``training.png`` go.
        title: figure title (e.g. the loss name).
        info: extra ``name -> value`` facts to print and save (e.g. the data folder used).

    Returns:
        the summary dict (also written to ``output_dir/summary.json``).
    """
    output_dir = Path(output_dir)
    metrics = {k: _scalar(v) for k, v in evaluator.state.metrics.items()}
    summary = {
        "title": title,
        **{str(k): v if isinstance(v, (int, float, bool, type(None))) else str(v) for k, v in (info or {}).items()},
        "iterations": int(trainer.state.iteration),
        "epochs": int(trainer.state.epoch),
        "seconds_per_iteration": float(timer.value()),
        "final_train_loss": float(metric_logger.loss[-1][1]) if metric_logger.loss else None,
        "validation": metrics,
        "best": {"metric": evaluator.state.key_metric_name, "value": float(evaluator.state.best_metric)},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    output = evaluator.state.output
    sample = output[0] if isinstance(output, list) and output else None
    figure = training_figure(output_dir / "training.png", metric_logger.loss, metric_logger.metrics, sample, title)
    summary["figure"] = str(figure)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"{title or 'run'}: {summary['iterations']} iterations, {summary['seconds_per_iteration']:.3f} s/iteration"
    ]
    lines += [f"  {name}: {value}" for name, value in (info or {}).items()]
    lines += [f"  {name:<24} {value:.4f}" for name, value in metrics.items()]
    lines += [f"  figure: {figure}", f"  summary: {output_dir / 'summary.json'}"]
    print("\n".join(lines), flush=True)
    return summary
