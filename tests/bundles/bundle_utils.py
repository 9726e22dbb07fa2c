"""Running the bundles in tests: in-process ConfigWorkflows with tiny CPU budgets, and the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"
SCHEMA = BUNDLES / "metadata_schema.json"

# Budgets small enough for a 2-core CPU: 2 iterations per epoch, tiny patches, few sections, no loader workers.
TINY = {
    "em_membrane_2d": {
        "epoch_length": 2,
        "val_interval": 1,
        "num_workers": 0,
        "patch_size": [64, 64],
        "num_samples": 2,
        "batch_size": 1,
        "topology_layers": ["conv1_2"],
        "train_sections": "00-03",
        "val_sections": "24-25",
    },
    "ct_spleen_3d": {
        "epoch_length": 2,
        "val_interval": 1,
        "num_workers": 0,
        "patch_size": [32, 32, 32],
        "num_samples": 1,
        "batch_size": 1,
        "spacing": [3.0, 3.0, 3.0],
        "network_def#channels": [8, 16, 32, 64, 128],
        "second_stage_epoch": 2,
    },
}
SYNTHETIC_DIR = {"em_membrane_2d": "synthetic_isbi2012_em", "ct_spleen_3d": "synthetic_spleen_ct"}


def configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / name) for name in names]


def workflow(bundle: str, names=("train.json",), **override):
    """A ConfigWorkflow of ``bundle`` (bundle_root = the bundle folder, no logging config)."""
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=configs(bundle, *names),
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(BUNDLES / bundle),
        **override,
    )


def run(wf):
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def tiny(bundle: str, work: Path, **override) -> dict:
    """Overrides for a tiny run writing everything under ``work``."""
    return {
        **TINY[bundle],
        "output_dir": str(work / "eval"),
        "ckpt_dir": str(work / "models"),
        **override,
    }


def synthetic(work: Path) -> dict:
    """Overrides that train on the synthetic stand-in, asked for explicitly: no data folder, fallback on."""
    return {"dataset_dir": str(work / "absent"), "synthetic_fallback": True}


def cli_args(override: dict) -> list[str]:
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in override.items()]


def subprocess_env() -> dict:
    # one thread per process: two ranks on two cores; no stray GPU
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


def run_cli(bundle: str, args: list[str], timeout: float = 300, launcher: list[str] | None = None):
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", *args]
    return subprocess.run(
        cmd, cwd=BUNDLES / bundle, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
