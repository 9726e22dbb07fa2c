"""`python -m build` makes a wheel and an sdist that work outside the source tree.

The wheel is installed into a fresh virtual environment that sees the current environment's third-party packages
(torch, MONAI, ...) through a ``.pth`` file, so nothing is downloaded, but not the source tree nor the editable
install of segloss (a path added by a ``.pth`` file is not a site directory, so its own ``.pth`` hooks, the
editable finder among them, do not run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PACKAGE_DATA = ["segloss/data/isbi2012_sha256.txt"]
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # no PYTHONPATH


def _pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)


def _shipped_files() -> list[str]:
    """Package data the wheel must carry: the digests, and every network weight file under segloss/networks."""
    weights = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "segloss" / "networks").glob("*.pt"))
    return PACKAGE_DATA + weights


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools instead of downloading one
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    version = _pyproject_version()
    wheel, sdist = out / f"segloss-{version}-py3-none-any.whl", out / f"segloss-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in out.iterdir())
    return wheel, sdist


def test_wheel_and_sdist_contents(dists):
    wheel, sdist = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "segloss/__init__.py" in names and "segloss/losses/dice.py" in names
    assert [f for f in _shipped_files() if f not in names] == [], "package data missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "bundles/", "benchmarks/", "docs/"))]
    prefix = sdist.name.removesuffix(".tar.gz")
    members = set(tarfile.open(sdist).getnames())
    assert {f"{prefix}/pyproject.toml", f"{prefix}/README.md"} <= members
    assert [f for f in _shipped_files() if f"{prefix}/{f}" not in members] == []


def test_wheel_works_in_a_fresh_venv(dists, tmp_path):
    wheel, _ = dists
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        cwd=tmp_path,  # away from the source tree and its segloss.egg-info, which pip would take as installed
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # after the install: pip would otherwise take the outer environment's editable segloss as already installed
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(f"{site}/outer_env.pth", "w") as f:
        f.write("\n".join(sorted(outer)) + "\n")
    check = textwrap.dedent(
        """
        import importlib.resources, json, torch
        import segloss, segloss.networks
        logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
        value = segloss.DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
        data = importlib.resources.files("segloss.data") / "isbi2012_sha256.txt"
        weights = sorted(p.name for p in importlib.resources.files("segloss.networks").iterdir() if p.name.endswith(".pt"))
        print(json.dumps({"file": segloss.__file__, "version": segloss.__version__, "loss": float(value),
                          "digests": data.is_file() and len(data.read_text()) > 0, "weights": weights}))
        """
    )
    result = subprocess.run(
        [str(python), "-c", check], cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(env_dir)), f"segloss came from {report['file']}, not the installed wheel"
    assert report["version"] == _pyproject_version()
    assert report["loss"] > 0 and report["digests"]
    assert report["weights"] == sorted(f.rsplit("/", 1)[1] for f in _shipped_files() if f.endswith(".pt"))
