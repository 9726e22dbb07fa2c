"""segloss.data.download with the network replaced by local files: hash checks, atomic writes, offline errors."""

import hashlib
import tarfile
import urllib.error
import warnings

import pytest
from conftest import SHARED_DATA
from monai.apps.utils import HashCheckError

from segloss.data.download import (
    DataUnavailableError,
    download_file,
    download_isbi2012,
    download_msd_spleen,
)


def _offline(url, dest, timeout):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(b"segloss test payload\n" * 100)
    return path


def test_download_file_url_with_matching_hash(tmp_path, source):
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = download_file(source.as_uri(), tmp_path / "dst" / "payload.bin", digest)
    assert out.read_bytes() == source.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["payload.bin"], "no temporary file left behind"


def test_download_file_hash_mismatch_leaves_nothing(tmp_path, source):
    dest = tmp_path / "dst" / "payload.bin"
    with pytest.raises(HashCheckError, match="expected 0+"):
        download_file(source.as_uri(), dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_file_md5(tmp_path, source):
    digest = hashlib.md5(source.read_bytes()).hexdigest()
    download_file(source.as_uri(), tmp_path / "a.bin", digest, "md5")
    with pytest.raises(ValueError, match="hash_type"):
        download_file(source.as_uri(), tmp_path / "b.bin", digest, "crc32")


def test_existing_file_is_checked_not_fetched(tmp_path, source):
    dest = tmp_path / "payload.bin"
    dest.write_bytes(source.read_bytes())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert download_file("https://unreachable.invalid/x", dest, digest, fetch=_offline) == dest
    dest.write_bytes(b"tampered")
    with pytest.raises(HashCheckError, match="existing file"):
        download_file("https://unreachable.invalid/x", dest, digest, fetch=_offline)


def test_offline_error_says_where_to_put_the_file(tmp_path):
    dest = tmp_path / "Task09_Spleen.tar"
    with pytest.raises(DataUnavailableError) as err:
        download_file("https://example.invalid/Task09_Spleen.tar", dest, "ab" * 16, "md5", fetch=_offline)
    message = str(err.value)
    assert str(dest) in message and "offline" in message and "md5" in message
    assert not dest.exists()


def test_missing_hash_warns(tmp_path, source):
    with pytest.warns(UserWarning, match="NOT verified"):
        download_file(source.as_uri(), tmp_path / "x.bin")


def _spleen_tar(tmp_path):
    tree = tmp_path / "build" / "Task09_Spleen"
    (tree / "imagesTr").mkdir(parents=True)
    (tree / "labelsTr").mkdir()
    (tree / "imagesTr" / "spleen_1.nii.gz").write_bytes(b"image")
    (tree / "labelsTr" / "spleen_1.nii.gz").write_bytes(b"label")
    (tree / "dataset.json").write_text("{}")
    archive = tmp_path / "mirror" / "Task09_Spleen.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="Task09_Spleen")
    return archive


def test_msd_spleen_download_and_extract(tmp_path):
    archive = _spleen_tar(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    out = download_msd_spleen(tmp_path / "data", url=archive.as_uri(), hash_val=md5)
    assert out == tmp_path / "data" / "Task09_Spleen"
    assert (out / "imagesTr" / "spleen_1.nii.gz").read_bytes() == b"image"
    # second call: present, no fetch at all
    assert download_msd_spleen(tmp_path / "data", fetch=_offline) == out


def test_msd_spleen_wrong_md5_and_offline(tmp_path):
    archive = _spleen_tar(tmp_path)
    with pytest.raises(HashCheckError):
        download_msd_spleen(tmp_path / "data", url=archive.as_uri(), hash_val="0" * 32)
    assert not (tmp_path / "data" / "Task09_Spleen").exists()
    with pytest.raises(DataUnavailableError, match="Task09_Spleen.tar") as err:
        download_msd_spleen(tmp_path / "data", fetch=_offline)
    assert "imagesTr" in str(err.value), "the message also says where an extracted copy may go"


def test_msd_spleen_default_resource_is_monais():
    from monai.apps import DecathlonDataset

    seen = {}

    def record(url, dest, timeout):
        seen["url"] = url
        raise urllib.error.URLError("offline")

    with pytest.raises(DataUnavailableError, match=DecathlonDataset.md5["Task09_Spleen"]):
        download_msd_spleen("/nonexistent-segloss-root", fetch=record)
    assert seen["url"] == DecathlonDataset.resource["Task09_Spleen"]


@pytest.fixture
def isbi_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    for remote in ("image", "label"):
        (mirror / remote).mkdir(parents=True)
        for i in range(30):
            (mirror / remote / f"{i}.png").write_bytes(f"{remote} {i}".encode())
    return mirror


def test_isbi2012_layout_and_hashes(tmp_path, isbi_mirror):
    hashes = {
        f"{local}/{i:02d}.png": hashlib.sha256(f"{remote} {i}".encode()).hexdigest()
        for i in range(30)
        for remote, local in (("image", "images"), ("label", "labels"))
    }
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{v}  {k}\n" for k, v in hashes.items()))
    root = download_isbi2012(tmp_path / "isbi", base_url=isbi_mirror.as_uri(), hashes=sums)
    assert (root / "images" / "07.png").read_bytes() == b"image 7"
    assert (root / "labels" / "29.png").read_bytes() == b"label 29"
    hashes["labels/29.png"] = "0" * 64
    with pytest.raises(HashCheckError, match="29.png"):
        download_isbi2012(tmp_path / "isbi", base_url=isbi_mirror.as_uri(), hashes=hashes)


def test_isbi2012_unverified_warns_once_and_incomplete_hashes_fail(tmp_path, isbi_mirror):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        download_isbi2012(tmp_path / "isbi", base_url=isbi_mirror.as_uri(), hashes=None)
    assert sum("NOT verified" in str(w.message) for w in caught) == 1
    with pytest.raises(ValueError, match="hashes"):
        download_isbi2012(tmp_path / "isbi", base_url=isbi_mirror.as_uri(), hashes={"images/00.png": "0"})


def test_isbi2012_offline_message(tmp_path):
    with pytest.raises(DataUnavailableError, match="labels/00.png ... 29.png"):
        download_isbi2012(tmp_path / "isbi", fetch=_offline)


def test_isbi2012_default_digests_reject_a_wrong_file_and_match_the_shared_copy(tmp_path, isbi_mirror):
    from segloss.data.download import ISBI2012_SHA256, _read_hashes

    pinned = _read_hashes(ISBI2012_SHA256)
    assert len(pinned) == 60 and all(len(v) == 64 for v in pinned.values())
    with pytest.raises(HashCheckError, match="00.png"):  # the mirror's stand-in bytes are not the real files
        download_isbi2012(tmp_path / "isbi", base_url=isbi_mirror.as_uri())
    shared = SHARED_DATA / "isbi2012_em"
    if shared.is_dir():  # the shared copy holds the upstream bytes unchanged (its README): it must verify
        for name, digest in pinned.items():
            assert hashlib.sha256((shared / name).read_bytes()).hexdigest() == digest, name
