"""segloss.data.datasets: datalists name missing files; the synthetic fallback is written once, atomically."""

import logging

import pytest

from segloss.data.datasets import isbi2012_datalist, nifti_datalist, parse_sections, resolve_dataset, split_datalist
from segloss.data.synthetic import write_ct_3d, write_membrane_2d


def test_parse_sections():
    assert parse_sections("00-03,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert parse_sections(5) == [5] and parse_sections(range(2)) == [0, 1]
    for bad in ("a-b", "5-2"):
        with pytest.raises(ValueError, match="sections"):
            parse_sections(bad)


def test_isbi2012_datalist_and_missing_file(tmp_path):
    write_membrane_2d(tmp_path, num=4, size=32)
    items = isbi2012_datalist(tmp_path, "01-02")
    assert [d["image"].split("/")[-1] for d in items] == ["01.png", "02.png"]
    (tmp_path / "labels" / "02.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels/02\.png"):
        isbi2012_datalist(tmp_path, "00-03")


def test_isbi2012_on_shared_data(shared_data):
    root = shared_data("isbi2012_em")
    train, val = isbi2012_datalist(root, "00-23"), isbi2012_datalist(root, "24-29")
    assert len(train) == 24 and len(val) == 6 and val[0]["label"].endswith("labels/24.png")


def test_nifti_datalist_dataset_json_and_pairing(tmp_path):
    write_ct_3d(tmp_path, num=3, size=16)
    assert [d["label"].split("/")[-1] for d in nifti_datalist(tmp_path)] == [f"case_00{i}.nii.gz" for i in range(3)]
    (tmp_path / "dataset.json").unlink()
    (tmp_path / "imagesTr" / "._case_000.nii.gz").write_bytes(b"macOS resource fork")
    assert len(nifti_datalist(tmp_path)) == 3, "hidden files are not cases"
    items = nifti_datalist(tmp_path, cases=["case_002", "case_000"])
    assert [d["image"].split("/")[-1] for d in items] == ["case_002.nii.gz", "case_000.nii.gz"]
    with pytest.raises(FileNotFoundError, match="case_009"):
        nifti_datalist(tmp_path, cases=["case_009"])
    (tmp_path / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"labelsTr/case_001\.nii\.gz"):
        nifti_datalist(tmp_path)


def test_nifti_datalist_shared_spleen(shared_data):
    items = nifti_datalist(shared_data("totalseg_examples_ct"), cases=["ts_abdomen_3mm", "ts_dicom_20slices"])
    assert len(items) == 2
    assert len(nifti_datalist(shared_data("msd_spleen_smoketest"))) == 1


def test_split_datalist(caplog):
    items = [{"image": str(i)} for i in range(5)]
    train, val = split_datalist(items, 2)
    assert [d["image"] for d in val] == ["3", "4"] and len(train) == 3
    with caplog.at_level(logging.WARNING):
        assert split_datalist(items[:1], 1) == (items[:1], items[:1])
    assert "smoke" in caplog.text
    with pytest.raises(ValueError, match="num_val"):
        split_datalist(items, 5)


def test_resolve_dataset_real_synthetic_and_strict(tmp_path):
    real = write_membrane_2d(tmp_path / "real", num=2, size=32)
    assert resolve_dataset(real, "isbi2012_em", tmp_path / "work") == str(real)
    out = resolve_dataset(tmp_path / "absent", "isbi2012_em", tmp_path / "work")
    assert len(isbi2012_datalist(out, "00-29")) == 30
    stamp = (tmp_path / "work" / "synthetic_isbi2012_em" / "images" / "00.png").stat().st_mtime_ns
    assert resolve_dataset(None, "isbi2012_em", tmp_path / "work") == out
    assert (tmp_path / "work" / "synthetic_isbi2012_em" / "images" / "00.png").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["synthetic_isbi2012_em"], "no temporary left"
    with pytest.raises(FileNotFoundError, match="download_msd_spleen"):
        resolve_dataset(tmp_path / "absent", "spleen_ct", tmp_path / "work", synthetic=False)
    with pytest.raises(ValueError, match="kind"):
        resolve_dataset(None, "liver", tmp_path)
