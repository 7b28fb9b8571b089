"""Image files and the folder layout: each problem is reported with code, patient and file."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import shared.cohort as cohort
from shared.cohort import find_volume, iter_volumes, read_image

from .conftest import make_mask, make_volume


def test_unknown_patient_folder(site, find_issue) -> None:
    # Prepare: a folder for a patient not in patients.csv (a misspelt id)
    site.write(make_volume("t2w"), "P0001", "pre", "t2w")
    # Execute
    report = site.check()
    # Assert: a warning (the folder is ignored), with a hint at the close id
    issue = find_issue(report, "unknown_patient", "warning", patient="P0001", file="images/P0001")
    assert "did you mean P001" in issue.message
    assert report.ok


def test_patient_without_images_folder(site, find_issue) -> None:
    # Prepare
    shutil.rmtree(site.root / "images" / "P003")
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "no_images", "error", patient="P003", file="images/P003")
    assert report.excluded_patients == {"P003"}


def test_missing_required_sequence(site, find_issue) -> None:
    # Prepare
    site.path("P002", "post", "dwi").unlink()
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "missing_image", "error", patient="P002", file=site.rel("P002", "post", "dwi"))
    assert report.excluded_patients == {"P002"} and report.n_usable_patients == 2


def test_only_t2w_required_site_without_dwi_passes(site, make_cfg) -> None:
    # Prepare: remove every DWI image and mask; the site config requires t2w only
    for root in ("images", "masks"):
        for p in (site.root / root).glob("*/*/dwi.nii.gz"):
            p.unlink()
    t2w_only = make_cfg(data={"sequences": ["t2w"]})
    # Execute
    strict = site.check()
    report = site.check(t2w_only)
    # Assert
    assert not strict.ok and "missing_image" in strict.codes()
    assert report.ok and report.issues == []
    assert len(iter_volumes(site.root, t2w_only)) == 3 * 2


def test_unknown_timepoint_sequence_and_file(site, find_issue) -> None:
    # Prepare
    site.write(make_volume("t2w"), "P001", "mid", "t2w")
    site.write(make_volume("t2w"), "P001", "pre", "flair")
    site.write(make_volume("t2w"), "P001", "pre", "T2W")
    (site.root / "images" / "P001" / "pre" / "notes.txt").write_text("x")
    # Execute
    report = site.check()
    # Assert: warnings only, each naming the entry
    assert report.ok
    find_issue(report, "unknown_timepoint", "warning", patient="P001", file="images/P001/mid")
    find_issue(report, "unknown_sequence", "warning", patient="P001", file="images/P001/pre/flair.nii.gz")
    upper = find_issue(report, "unknown_sequence", "warning", patient="P001", file="images/P001/pre/T2W.nii.gz")
    assert "rename to t2w.nii.gz" in upper.message
    find_issue(report, "unknown_file", "warning", patient="P001", file="images/P001/pre/notes.txt")


def test_random_bytes_file(site, find_issue) -> None:
    # Prepare
    site.path("P001", "pre", "t2w").write_bytes(np.random.default_rng(0).bytes(3000))
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "unreadable_file", "error", patient="P001", file=site.rel("P001", "pre", "t2w"))
    assert "not gzip-compressed" in issue.message
    assert "P001" in report.excluded_patients


@pytest.mark.parametrize("fast", [False, True], ids=["pixels", "headers-only"])
def test_truncated_gzip(site, find_issue, fast) -> None:
    # Prepare: cut a valid .nii.gz in half (ITK itself would read it, filling zeros)
    p = site.path("P002", "post", "t2w")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    # Execute
    report = site.check(read_pixels=not fast)
    # Assert
    issue = find_issue(report, "unreadable_file", "error", patient="P002", file=site.rel("P002", "post", "t2w"))
    assert "truncated" in issue.message


def test_truncated_uncompressed_nifti(site, find_issue) -> None:
    # Prepare: an uncompressed .nii missing its last voxels
    site.path("P003", "pre", "dwi").unlink()
    p = site.write(make_volume("dwi"), "P003", "pre", "dwi", ext=".nii")
    p.write_bytes(p.read_bytes()[:-200])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "unreadable_file", "error", patient="P003", file=site.rel("P003", "pre", "dwi", ext=".nii"))
    assert "truncated" in issue.message


def test_empty_file(site, find_issue) -> None:
    # Prepare
    site.path("P001", "post", "dwi").write_bytes(b"")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "unreadable_file", "error", patient="P001", file=site.rel("P001", "post", "dwi"))
    assert "empty" in issue.message


def test_nan_voxels(site, find_issue) -> None:
    # Prepare
    img = make_volume("t2w")
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, :3] = [np.nan, np.inf, np.nan]
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    site.write(bad, "P002", "pre", "t2w")
    # Execute
    report = site.check()
    fast = site.check(read_pixels=False)
    # Assert: found when pixels are read, skipped in the fast header-only mode
    issue = find_issue(report, "nonfinite_voxels", "error", patient="P002", file=site.rel("P002", "pre", "t2w"))
    assert "3 voxel(s)" in issue.message
    assert fast.ok


def test_constant_image(site, find_issue) -> None:
    # Prepare
    img = sitk.Image(16, 16, 4, sitk.sitkInt16)
    img.SetSpacing((0.7, 0.7, 4.0))
    img.SetOrigin((-5.0, -5.0, 0.0))
    site.write(img, "P003", "post", "t2w")
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "constant_image", "error", patient="P003", file=site.rel("P003", "post", "t2w"))


def test_implausible_spacing(site, find_issue) -> None:
    # Prepare: 50 mm slices (image and mask agree, so only the spacing is wrong)
    site.write(make_volume("t2w", spacing=(0.7, 0.7, 50.0)), "P001", "post", "t2w")
    site.write(make_mask("t2w", spacing=(0.7, 0.7, 50.0)), "P001", "post", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "implausible_spacing", "error", patient="P001", file=site.rel("P001", "post", "t2w"))
    assert "50" in issue.message
    assert report.codes("error") == ["implausible_spacing"]


def test_ambiguous_duplicate_files(site, find_issue) -> None:
    # Prepare: t2w.nii.gz and t2w.nrrd for the same volume
    site.write(make_volume("t2w", seed=9), "P002", "pre", "t2w", ext=".nrrd")
    # Execute
    report = site.check()
    # Assert: reported; find_volume keeps its documented order
    issue = find_issue(report, "ambiguous_file", "error", patient="P002", file=site.rel("P002", "pre", "t2w"))
    assert site.rel("P002", "pre", "t2w", ext=".nrrd") in issue.message
    assert find_volume(site.root, "P002", "pre", "t2w") == site.path("P002", "pre", "t2w")


def test_2d_image(site, find_issue) -> None:
    # Prepare
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32))
    site.write(img, "P003", "pre", "t2w")
    # Execute
    report = site.check()
    # Assert: not 3-D; its (3-D) mask is not compared to it
    issue = find_issue(report, "not_3d", "error", patient="P003", file=site.rel("P003", "pre", "t2w"))
    assert "2-D" in issue.message
    assert "geometry_mismatch" not in report.codes()


def _write_dicom_series(img: sitk.Image, folder) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    img = sitk.Cast(img, sitk.sitkInt16)
    for z in range(img.GetDepth()):
        s = img[:, :, z]
        for tag, value in {
            "0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(z + 1), "0018|0050": f"{img.GetSpacing()[2]}",
            "0020|0032": "\\".join(str(c) for c in img.TransformIndexToPhysicalPoint((0, 0, z))),
            "0028|0030": "\\".join(str(c) for c in img.GetSpacing()[:2]),
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_folder_is_accepted(site) -> None:
    # Prepare: replace P002's pre T2W file by a DICOM series folder on the same grid
    site.path("P002", "pre", "t2w").unlink()
    folder = site.root / "images" / "P002" / "pre" / "t2w"
    _write_dicom_series(make_volume("t2w", seed=1), folder)
    # Execute
    report = site.check()
    img = read_image(folder)
    # Assert
    assert report.ok, report.to_table().to_string()
    assert find_volume(site.root, "P002", "pre", "t2w") == folder
    assert img.GetSize() == (16, 16, 4) and img.GetSpacing() == pytest.approx((0.7, 0.7, 4.0))


def test_folder_without_dicom_series(site, find_issue) -> None:
    # Prepare
    site.path("P001", "pre", "dwi").unlink()
    folder = site.root / "images" / "P001" / "pre" / "dwi"
    folder.mkdir()
    (folder / "readme.txt").write_text("not dicom")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "unreadable_file", "error", patient="P001", file="images/P001/pre/dwi")
    assert "no DICOM series" in issue.message


def test_unexpected_exception_becomes_an_issue(site, find_issue, monkeypatch) -> None:
    # Prepare: the header reader blows up on one file
    target = site.path("P003", "post", "dwi")
    real = cohort.read_volume_info

    def flaky(path):
        if str(path) == str(target):
            raise MemoryError("simulated")
        return real(path)

    monkeypatch.setattr(cohort, "read_volume_info", flaky)
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "unexpected_error", "error", patient="P003", file=site.rel("P003", "post", "dwi"))
    assert "MemoryError: simulated" in issue.message


def test_unreadable_gzip_is_never_silently_read(site) -> None:
    # Prepare: a gzip member whose payload is not NIfTI
    site.path("P001", "pre", "t2w").write_bytes(gzip.compress(os.urandom(500)))
    # Execute
    report = site.check()
    # Assert
    assert "unreadable_file" in report.codes("error")
