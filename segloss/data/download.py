"""Download helpers for the real data sets, with hash checks, atomic writes and a clear offline failure.

- :func:`download_msd_spleen`: Medical Segmentation Decathlon Task09 Spleen (``Task09_Spleen.tar``, 41 labelled
  portal-venous CT volumes, CC BY-SA 4.0) from the URL MONAI uses (``monai.apps.DecathlonDataset.resource``),
  verified against MONAI's recorded md5.
- :func:`download_isbi2012`: the 30 ISBI 2012 EM training sections as PNGs (copies of the challenge's
  ``train-volume.tif`` / ``train-labels.tif`` in the public ``zhixuhao/unet`` repository). No published checksum
  of these files was found, so they are verified only when you pass ``hashes``; otherwise a warning says they
  are unverified. Non-commercial use only (the challenge's terms).

Every file is fetched to a temporary name beside its destination, hash-checked, then renamed into place, so an
interrupted download never leaves a file that looks complete. Without network access the helpers fail within
``timeout`` seconds with a :class:`DataUnavailableError` that says where to put the files by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["DataUnavailableError", "download_file", "download_isbi2012", "download_msd_spleen", "fetch_url"]

logger = logging.getLogger(__name__)

# pinned to the commit whose bytes the digests in isbi2012_sha256.txt were taken from
ISBI2012_BASE_URL = "https://raw.githubusercontent.com/zhixuhao/unet/b45af4d/data/membrane/train"
ISBI2012_SHA256 = Path(__file__).with_name("isbi2012_sha256.txt")
ISBI2012_NUM_SECTIONS = 30

Fetch = Callable[[str, Path, float], None]


class DataUnavailableError(RuntimeError):
    """A data set could not be downloaded (typically: no network); the message says how to provide it by hand."""


def fetch_url(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest`` (``http(s)://`` or ``file://``); ``timeout`` bounds connecting and each read."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _file_hash(path: Path, hash_type: str) -> str:
    if hash_type not in ("md5", "sha1", "sha256", "sha512"):
        raise ValueError(f"`hash_type` must be md5, sha1, sha256 or sha512, got {hash_type!r}.")
    h = hashlib.new(hash_type, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, hash_val: str | None, hash_type: str, what: str) -> None:
    from monai.apps.utils import HashCheckError

    if hash_val is None:
        return
    actual = _file_hash(path, hash_type)
    if actual != hash_val.lower():
        raise HashCheckError(f"{hash_type} of {what} {path} is {actual}, expected {hash_val}.")


def download_file(
    url: str,
    filepath: str | Path,
    hash_val: str | None = None,
    hash_type: str = "sha256",
    *,
    fetch: Fetch = fetch_url,
    timeout: float = 30.0,
    manual_hint: str = "",
) -> Path:
    """Download ``url`` to ``filepath`` unless it is already there, verifying ``hash_val`` either way.

    Like :func:`monai.apps.download_url`: an existing file is checked, not fetched again, and a hash mismatch
    raises ``monai.apps.utils.HashCheckError`` (a ``ValueError``). Unlike it, the network has a ``timeout`` and a
    failed fetch raises :class:`DataUnavailableError` naming ``filepath``, so an offline machine fails fast with
    instructions. The file is written to a temporary name in the same folder and renamed into place after the
    check (atomic on POSIX).

    Args:
        url: source URL (``https://``, ``http://`` or ``file://``).
        filepath: destination.
        hash_val: expected hex digest, or None to skip verification (a warning says so).
        hash_type: ``md5``, ``sha1``, ``sha256`` or ``sha512``.
        fetch: ``fetch(url, dest, timeout)`` writing ``url`` to ``dest``; a test seam.
        timeout: seconds for connecting and for each read.
        manual_hint: extra sentence for the error message (e.g. where an extracted copy may go instead).
    """
    filepath = Path(filepath)
    if filepath.is_file():
        _verify(filepath, hash_val, hash_type, "existing file")
        return filepath
    if hash_val is None:
        warnings.warn(f"no hash given for {url}: {filepath} is NOT verified.", stacklevel=2)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filepath.name}.", suffix=".part", dir=filepath.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            fetch(url, tmp, timeout)
        except (OSError, urllib.error.URLError) as e:  # URLError, timeouts and refused connections are OSErrors
            check = f" (expected {hash_type} {hash_val})" if hash_val else ""
            raise DataUnavailableError(
                f"could not download {url} ({e}). If this machine is offline, download that file on a machine "
                f"with internet access and put it at {filepath}{check}; it is then used without a download. "
                f"{manual_hint}".strip()
            ) from e
        _verify(tmp, hash_val, hash_type, f"the file downloaded from {url} to")
        os.replace(tmp, filepath)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(f"downloaded {url} -> {filepath}")
    return filepath


def download_msd_spleen(
    root: str | Path,
    *,
    url: str | None = None,
    hash_val: str | None = None,
    hash_type: str = "md5",
    fetch: Fetch = fetch_url,
    timeout: float = 30.0,
) -> Path:
    """Get MSD Task09 Spleen into ``root/Task09_Spleen`` (``imagesTr/``, ``labelsTr/``, ``dataset.json``).

    Nothing is fetched when ``root/Task09_Spleen/imagesTr`` exists. Otherwise ``root/Task09_Spleen.tar`` (about
    1.5 GB) is downloaded, or taken as is when already there, checked against MONAI's md5 and extracted to a
    temporary folder that is renamed into place.

    By hand (offline machine): put ``Task09_Spleen.tar`` in ``root``, or its extracted ``Task09_Spleen`` folder.

    Args:
        root: parent folder.
        url, hash_val: override MONAI's ``DecathlonDataset.resource["Task09_Spleen"]`` / ``md5[...]`` (e.g. a
            mirror).
        hash_type: type of ``hash_val``.
        fetch, timeout: see :func:`download_file`.

    Returns:
        ``root/Task09_Spleen``.
    """
    from monai.apps import DecathlonDataset
    from monai.apps.utils import extractall

    root = Path(root)
    out = root / "Task09_Spleen"
    if (out / "imagesTr").is_dir():
        return out
    if url is None:
        url, hash_val, hash_type = (
            DecathlonDataset.resource["Task09_Spleen"],
            DecathlonDataset.md5["Task09_Spleen"],
            "md5",
        )
    archive = download_file(
        url,
        root / "Task09_Spleen.tar",
        hash_val,
        hash_type,
        fetch=fetch,
        timeout=timeout,
        manual_hint=f"Or extract it yourself so that {out / 'imagesTr'} exists.",
    )
    tmp = Path(tempfile.mkdtemp(prefix=".Task09_Spleen.", dir=root))
    try:
        extractall(archive, tmp, file_type="tar", has_base=False)
        extracted = tmp / "Task09_Spleen"
        if not (extracted / "imagesTr").is_dir():
            raise DataUnavailableError(f"{archive} does not hold Task09_Spleen/imagesTr; delete it and retry.")
        os.replace(extracted, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_hashes(hashes: Mapping[str, str] | str | Path) -> dict[str, str]:
    """A mapping, or a ``sha256sum``-style file (``<hex>  <relative path>`` per line)."""
    if isinstance(hashes, Mapping):
        return {str(k): str(v) for k, v in hashes.items()}
    out = {}
    for line in Path(hashes).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip().lstrip("*")] = digest
    return out


def download_isbi2012(
    root: str | Path,
    *,
    hashes: Mapping[str, str] | str | Path | None = ISBI2012_SHA256,
    hash_type: str = "sha256",
    base_url: str = ISBI2012_BASE_URL,
    fetch: Fetch = fetch_url,
    timeout: float = 30.0,
) -> Path:
    """Get the 30 ISBI 2012 training sections into ``root/images/NN.png`` and ``root/labels/NN.png``.

    Section ``i`` is ``{base_url}/image/{i}.png`` and ``{base_url}/label/{i}.png`` (the ``zhixuhao/unet`` layout).
    Labels keep the challenge polarity: **0 = membrane**, 255 = cell. Files already present are kept (and checked
    when a hash is known).

    By hand (offline machine): put the 30 PNG pairs at ``root/images/00.png ... 29.png`` and
    ``root/labels/00.png ... 29.png`` (8-bit greyscale, 512 x 512), e.g. pages 0-29 of the challenge's
    ``train-volume.tif`` and ``train-labels.tif``.

    Args:
        root: destination folder.
        hashes: expected digests by relative path (``"images/00.png"``), as a mapping or a ``sha256sum``-style
            file. Default: the SHA-256 of the 60 files at ``zhixuhao/unet`` commit b45af4d, shipped with segloss
            (``segloss/data/isbi2012_sha256.txt``). ``None`` verifies nothing (with a warning), e.g. for a mirror.
        hash_type: type of the digests in ``hashes``.
        base_url: mirror of ``zhixuhao/unet``'s ``data/membrane/train`` folder.
        fetch, timeout: see :func:`download_file`.

    Returns:
        ``root``.
    """
    root = Path(root)
    expected = _read_hashes(hashes) if hashes is not None else {}
    names = [f"{d}/{i:02d}.png" for i in range(ISBI2012_NUM_SECTIONS) for d in ("images", "labels")]
    if hashes is not None and (missing := [n for n in names if n not in expected]):
        raise ValueError(f"`hashes` has no digest for {missing[:3]}{' ...' if len(missing) > 3 else ''}.")
    if hashes is None:
        warnings.warn("download_isbi2012: no `hashes` given, the ISBI 2012 files are NOT verified.", stacklevel=2)
    hint = f"Or place all 30 sections by hand: {root}/images/00.png ... 29.png and {root}/labels/00.png ... 29.png."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning above instead of one per file
        for i in range(ISBI2012_NUM_SECTIONS):
            for remote, local in (("image", "images"), ("label", "labels")):
                rel = f"{local}/{i:02d}.png"
                download_file(
                    f"{base_url}/{remote}/{i}.png",
                    root / rel,
                    expected.get(rel),
                    hash_type,
                    fetch=fetch,
                    timeout=timeout,
                    manual_hint=hint,
                )
    return root
