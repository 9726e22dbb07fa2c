"""Bundle layout, metadata against the offline schema, and the documented smoke commands."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest
from bundle_utils import BUNDLES, SCHEMA, run_cli

BUNDLE_NAMES = ["em_membrane_2d", "ct_spleen_3d"]
FILES = [
    "configs/metadata.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/inference.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
    "models/.gitkeep",
]


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_layout_and_json(bundle):
    root = BUNDLES / bundle
    assert [f for f in FILES if not (root / f).is_file()] == []
    for path in (root / "configs").glob("*.json"):
        json.loads(path.read_text())  # valid JSON


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_metadata_offline(bundle, tmp_path):
    from monai.bundle import verify_metadata

    meta = BUNDLES / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))  # the schema exists, so nothing is downloaded
    content = json.loads(meta.read_text())
    assert "segloss" in content["required_packages_version"]
    # the schema is not vacuous: a missing tensor field and a missing top-level field are rejected
    for path in (("network_data_format", "outputs", "pred", "channel_def"), ("network_data_format",)):
        broken = json.loads(meta.read_text())
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        (tmp_path / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=path[-1]):
            verify_metadata(meta_file=str(tmp_path / "meta.json"), filepath=str(SCHEMA))


def _smoke_command(bundle) -> list[str]:
    readme = (BUNDLES / bundle / "docs" / "README.md").read_text()
    section = re.search(r"^#+ [^\n]*smoke[^\n]*\n(.*?)(?=^#+ |\Z)", readme, flags=re.S | re.M | re.I)
    assert section, "the README has a heading containing 'smoke'"
    command = re.search(r"```bash\n(.*?)```", section.group(1), flags=re.S).group(1).strip()
    args = shlex.split(command)
    assert args[:4] == ["python", "-m", "monai.bundle", "run"]
    return args[4:]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_readme_smoke_command_runs(bundle, tmp_path):
    args = _smoke_command(bundle) + [f"--output_dir={tmp_path / 'eval'}", f"--ckpt_dir={tmp_path / 'models'}"]
    result = run_cli(bundle, args, launcher=[sys.executable])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "last.pt").is_file()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_every_loss_option_builds_and_trains(bundle):
    """Each documented `--loss @loss_options#<name>` builds and gives a finite loss with gradients."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    names = list(parser["loss_options"])
    assert parser["loss"].removeprefix("@loss_options#") in names
    spatial = (32, 32) if bundle == "em_membrane_2d" else (16, 16, 16)
    logits = torch.randn(2, 2, *spatial, requires_grad=True)
    label = (torch.rand(2, 1, *spatial) > 0.7).float()
    for name in names:
        parser["loss"] = f"@loss_options#{name}"
        loss = parser.get_parsed_content("loss", lazy=False)
        value = loss(logits, label)
        (grad,) = torch.autograd.grad(value, logits)
        assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_changelog_names_the_current_version_first(bundle):
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    versions = list(meta["changelog"])
    assert versions[0] == meta["version"], "each config change bumps `version` and adds its changelog entry on top"
    as_tuples = [tuple(int(part) for part in v.split(".")) for v in versions]
    assert as_tuples == sorted(as_tuples, reverse=True) and len(set(as_tuples)) == len(as_tuples)
    assert all(meta["changelog"][v].strip() for v in versions)


MODEL_ZOO_FILE_LIMIT = 25 * 1024**2  # bytes; larger files are fetched through large_files.yml


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_files_over_the_model_zoo_limit_are_in_large_files_yml(bundle):
    import subprocess

    import yaml

    root = BUNDLES / bundle
    tracked = subprocess.run(["git", "ls-files", "."], cwd=root, capture_output=True, text=True, check=True)
    files = {root / name for name in tracked.stdout.split()} | {root / "models" / "model.pt"}
    large = {str(p.relative_to(root)) for p in files if p.is_file() and p.stat().st_size > MODEL_ZOO_FILE_LIMIT}
    listed = set()
    if (root / "large_files.yml").is_file():
        entries = yaml.safe_load((root / "large_files.yml").read_text())["large_files"]
        listed = {entry["path"].removeprefix("./") for entry in entries}
        assert all(entry.get("url") for entry in entries), "every large file says where to fetch it"
    assert large <= listed, f"files over 25 MB must be listed in {bundle}/large_files.yml: {sorted(large - listed)}"


def _readme_commands(bundle: str, subcommand: str) -> list[list[str]]:
    readme = (BUNDLES / bundle / "docs" / "README.md").read_text()
    lines = re.findall(rf"^python -m monai\.bundle {subcommand} .*$", readme, flags=re.M)
    assert lines, f"the README documents `python -m monai.bundle {subcommand}`"
    return [shlex.split(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_readme_verify_net_in_out_command_passes(bundle):
    """`python -m monai.bundle verify_net_in_out` (as documented) builds the network and checks its in/out shapes."""
    import subprocess

    from bundle_utils import subprocess_env

    for args in _readme_commands(bundle, "verify_net_in_out"):
        result = subprocess.run(
            [sys.executable, *args[1:]],
            cwd=BUNDLES / bundle,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "data shape of network is verified" in result.stdout + result.stderr
