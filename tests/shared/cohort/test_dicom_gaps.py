"""Damaged DICOM series and NaN/inf voxels: one decision shared by the checker and every reader (issue 13).

A series with a missing, duplicate or zero-byte slice, or unevenly spaced slices, is read by ITK as if
its slices were evenly spaced (a wrong volume, only a C++ warning on the terminal). The checker gives
each fault its own row and fix, does not blame the volume's own mask for the geometry the gap caused,
and :func:`shared.cohort.read_image` (what preprocessing reads with) refuses the same series.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.cohort import CohortError, decide_exclusions, read_image
from shared.cohort_io import SERIES_FIX, dicom_series_files, dicom_series_problems

from .conftest import make_volume


def write_series(img: sitk.Image, folder: Path, *, skip: tuple[int, ...] = (), dup: tuple[int, ...] = (),
                 empty: tuple[int, ...] = (), shift: dict[int, float] | None = None) -> Path:
    """One DICOM file per slice of ``img``; ``skip`` leaves slices out, ``dup`` copies them, ``empty``
    truncates them to 0 bytes, ``shift`` moves slices along z by that many mm."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    img = sitk.Cast(img, sitk.sitkInt16)
    for z in range(img.GetDepth()):
        if z in skip:
            continue
        s = img[:, :, z]
        pos = list(img.TransformIndexToPhysicalPoint((0, 0, z)))
        pos[2] += (shift or {}).get(z, 0.0)
        for tag, value in {
            "0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.9.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.9.2",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(z + 1), "0018|0050": f"{img.GetSpacing()[2]}",
            "0020|0032": "\\".join(str(c) for c in pos), "0028|0030": "\\".join(str(c) for c in img.GetSpacing()[:2]),
        }.items():
            s.SetMetaData(tag, value)
        path = folder / f"IM{z:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(s)
        if z in dup:
            shutil.copy(path, folder / f"IM{z:04d}_copy.dcm")
        if z in empty:
            path.write_bytes(b"")
    return folder


def tall(seed: int = 0) -> sitk.Image:
    """A t2w-like volume with 8 slices (enough for a gap in the middle)."""
    return make_volume("t2w", seed=seed, size=(16, 16, 8))


@pytest.mark.parametrize(("kw", "code", "words"), [
    ({"skip": (3,)}, "dicom_missing_slices", "missing"),
    ({"dup": (3,)}, "dicom_duplicate_slices", "twice"),
    ({"empty": (3,)}, "dicom_empty_file", "IM0003.dcm"),
    ({"shift": {5: 1.0, 6: 1.0, 7: 1.0}}, "dicom_nonuniform_spacing", "varies"),
])
def test_series_problems(tmp_path: Path, kw: dict, code: str, words: str) -> None:
    folder = write_series(tall(), tmp_path / "t2w", **kw)
    files, _ = dicom_series_files(folder)
    problems = dicom_series_problems(folder, files)
    codes = [p.code for p in problems]
    # a zero-byte slice is also a gap in the positions GDCM can read
    assert codes == ([code, "dicom_missing_slices"] if code == "dicom_empty_file" else [code])
    assert words in problems[0].message
    with pytest.raises(CohortError, match="damaged DICOM series") as err:
        read_image(folder)
    assert str(folder) in str(err.value)


def test_sound_series_has_no_problem(tmp_path: Path) -> None:
    folder = write_series(tall(), tmp_path / "t2w")
    files, _ = dicom_series_files(folder)
    assert dicom_series_problems(folder, files) == []
    assert read_image(folder).GetSize() == (16, 16, 8)


def _site_with_series(site, tmp_path: Path, **kw) -> Path:
    """P002's pre T2W as an 8-slice DICOM series (damaged by ``kw``) with its own mask on the true grid."""
    site.path("P002", "pre", "t2w").unlink()
    folder = write_series(tall(seed=1), site.root / "images" / "P002" / "pre" / "t2w", **kw)
    mask = sitk.GetImageFromArray(np.pad(np.ones((4, 4, 4), np.uint8), ((2, 2), (6, 6), (6, 6))))
    mask.CopyInformation(tall(seed=1))
    site.write(mask, "P002", "pre", "t2w", kind="mask")
    return folder


@pytest.mark.parametrize(("kw", "code"), [({"skip": (3,)}, "dicom_missing_slices"),
                                          ({"dup": (4,)}, "dicom_duplicate_slices"),
                                          ({"empty": (2,)}, "dicom_empty_file"),
                                          ({"shift": {6: 1.5, 7: 1.5}}, "dicom_nonuniform_spacing")])
def test_checker_gives_the_gap_its_own_row_and_fix(site, tmp_path, find_issue, capfd, kw, code) -> None:
    # Prepare
    _site_with_series(site, tmp_path, **kw)
    # Execute
    report = site.check()
    # Assert: its own row, naming the patient and the series folder, with the series fix
    issue = find_issue(report, code, "error", patient="P002", file="images/P002/pre/t2w")
    assert issue.fix == SERIES_FIX
    # the mask drawn on the true grid is not blamed for the geometry the damage caused
    assert not [i for i in report.issues if i.code == "geometry_mismatch" and i.patient_id == "P002"]
    assert "P002" in report.excluded_patients
    # ITK's unattributed C++ warning does not reach the terminal
    captured = capfd.readouterr()
    assert "Non uniform sampling" not in captured.err + captured.out


def test_sound_series_with_its_mask_passes(site, tmp_path) -> None:
    _site_with_series(site, tmp_path)
    report = site.check()
    assert report.ok, report.to_table().to_string()


def test_nan_voxels_are_an_error_for_the_checker_and_every_reader(site, find_issue) -> None:
    # Prepare: NaN and inf in P003's post DWI (ITK would read them from NIfTI as 0)
    img = sitk.ReadImage(str(site.path("P003", "post", "dwi")), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    site.write(bad, "P003", "post", "dwi")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "nonfinite_voxels", "error", patient="P003", file=site.rel("P003", "post", "dwi"))
    assert "4 voxel(s)" in issue.message and "excluded everywhere" in issue.fix
    with pytest.raises(CohortError, match="NaN or infinite"):
        read_image(site.path("P003", "post", "dwi"))


def test_the_rule_decides_patient_or_volume(site, make_cfg) -> None:
    # Prepare: a 4-D image (a volume fault) for P001 and an empty label for P002 (a patient fault)
    arr = np.zeros((2, 4, 16, 16), np.float32)
    site.write(sitk.GetImageFromArray(arr, isVector=False), "P001", "pre", "dwi")
    site.write_csv(rows=("P001,0,1,61,M,3.2,T3", "P002,,,55,F,1.0,T3b", "P003,3,0,70,M,8.5,T4a"))
    # Execute
    by_patient = site.check()
    by_volume = site.check(make_cfg(check={"exclusion": "volume"}))
    # Assert: the patient rule removes both patients entirely
    assert by_patient.rule == "patient" and by_patient.excluded_patients == {"P001", "P002"}
    assert by_patient.n_usable_patients == 1
    # the volume rule removes P001's faulty volume only, and P002 (its fault is not about a volume)
    assert by_volume.excluded_patients == {"P002"}
    assert ("P001", "pre", "dwi") in by_volume.excluded_volumes
    assert by_volume.n_usable_patients == 2
    # the decision is a pure function of the issues and the rule
    assert decide_exclusions(by_patient.issues, "volume") == by_volume.exclusions
    assert all(e.rule == "volume" and e.reason for e in by_volume.exclusions)
