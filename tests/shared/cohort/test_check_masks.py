"""Mask problems: geometry, emptiness, labels, size, missing masks and the second rater."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from shared.cohort import find_fallback_mask

from .conftest import make_mask, make_volume


def test_mask_origin_shifted(site, find_issue) -> None:
    # Prepare: the mask is 5 mm off in y
    site.write(make_mask("t2w", origin=(-5.0, 0.0, 0.0)), "P001", "pre", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert: says what differs and by how much
    issue = find_issue(report, "geometry_mismatch", "error", patient="P001", file=site.rel("P001", "pre", "t2w", "mask"))
    assert "origin" in issue.message and "shifted by (0, 5, 0) mm" in issue.message
    assert site.rel("P001", "pre", "t2w") in issue.message  # names the image too
    assert "spacing" not in issue.message


def test_mask_spacing_different(site, find_issue) -> None:
    # Prepare
    site.write(make_mask("dwi", spacing=(1.5, 1.5, 4.0)), "P002", "post", "dwi", kind="mask")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "geometry_mismatch", "error", patient="P002",
                       file=site.rel("P002", "post", "dwi", "mask"))
    assert "spacing (1.5, 1.5, 4)" in issue.message and "0.1 mm" in issue.message


def test_mask_size_different_is_named(site, find_issue) -> None:
    # Prepare
    site.write(make_mask("t2w", size=(16, 16, 5)), "P003", "pre", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "geometry_mismatch", "error", patient="P003")
    assert "size (16, 16, 5) vs image (16, 16, 4)" in issue.message


def test_geometry_within_tolerance_passes(site) -> None:
    # Prepare: origin off by 1e-5 mm (float noise), tolerance 1e-3 x 0.7 mm
    site.write(make_mask("t2w", origin=(-5.0 + 1e-5, -5.0, 0.0)), "P001", "pre", "t2w", kind="mask")
    # Execute / Assert
    assert site.check().ok


def test_empty_mask(site, find_issue) -> None:
    # Prepare
    site.write(make_mask("t2w", value=0), "P002", "pre", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "empty_mask", "error", patient="P002", file=site.rel("P002", "pre", "t2w", "mask"))


def _mask_with(values: np.ndarray, seq: str = "t2w") -> sitk.Image:
    ref = make_mask(seq)
    img = sitk.GetImageFromArray(values)
    img.CopyInformation(ref)
    return img


def test_multi_label_mask_is_an_error(site, find_issue) -> None:
    # Prepare: labels 1 and 2
    arr = sitk.GetArrayFromImage(make_mask("t2w"))
    arr[2] *= 2
    site.write(_mask_with(arr), "P003", "post", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "non_binary_mask", "error", patient="P003", file=site.rel("P003", "post", "t2w", "mask"))
    assert "several labels" in issue.message and "{0, 1, 2}" in issue.message


def test_fractional_mask_is_an_error(site, find_issue) -> None:
    # Prepare: a probability map
    arr = sitk.GetArrayFromImage(make_mask("t2w")).astype(np.float32) * 0.7
    site.write(_mask_with(arr), "P003", "post", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert
    assert "fractional" in find_issue(report, "non_binary_mask", "error", patient="P003").message


def test_single_label_not_one_is_a_warning(site, find_issue) -> None:
    # Prepare: values {0, 255}
    site.write(make_mask("t2w", value=255), "P001", "post", "t2w", kind="mask")
    # Execute
    report = site.check()
    # Assert: will be binarised, the site stays usable
    issue = find_issue(report, "mask_label_value", "warning", patient="P001",
                       file=site.rel("P001", "post", "t2w", "mask"))
    assert "binarised" in issue.message
    assert report.ok


def test_mask_too_small_is_a_warning(site, find_issue, make_cfg) -> None:
    # Prepare: 32 voxels, but the site wants 50
    cfg = make_cfg(check={"min_mask_voxels": 50})
    # Execute
    report = site.check(cfg)
    # Assert
    find_issue(report, "mask_too_small", "warning", patient="P001", file=site.rel("P001", "pre", "t2w", "mask"))
    assert report.ok


def test_missing_mask_with_overlapping_mask_of_other_sequence_warns(site, find_issue) -> None:
    # Prepare: no own DWI mask; the T2W mask of the same timepoint covers the same place
    site.path("P002", "pre", "dwi", "mask").unlink()
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "mask_from_other_sequence", "warning", patient="P002",
                       file=site.rel("P002", "pre", "dwi", "mask"))
    assert site.rel("P002", "pre", "t2w", "mask") in issue.message and "physical space" in issue.message
    assert report.ok
    assert find_fallback_mask(site.root, "P002", "pre", "dwi", site.cfg) == site.path("P002", "pre", "t2w", "mask")


def test_no_mask_at_the_timepoint_is_an_error(site, find_issue) -> None:
    # Prepare: neither sequence has a mask at post
    site.path("P003", "post", "dwi", "mask").unlink()
    site.path("P003", "post", "t2w", "mask").unlink()
    # Execute
    report = site.check()
    # Assert: both volumes, naming the outcome in preprocessing
    for seq in ("t2w", "dwi"):
        issue = find_issue(report, "no_mask", "error", patient="P003", file=site.rel("P003", "post", seq, "mask"))
        assert "no_mask" in issue.message and "no mask at post" in issue.message
    assert find_fallback_mask(site.root, "P003", "post", "dwi", site.cfg) is None


def test_non_overlapping_other_mask_cannot_serve(site, find_issue) -> None:
    # Prepare: the DWI image lies 200 mm away from the T2W mask
    site.path("P001", "post", "dwi", "mask").unlink()
    site.write(make_volume("dwi", origin=(200.0, 0.0, 0.0)), "P001", "post", "dwi")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "no_mask", "error", patient="P001", file=site.rel("P001", "post", "dwi", "mask"))
    assert "does not overlap" in issue.message


def test_require_masks_makes_a_missing_mask_an_error(site, find_issue, make_cfg) -> None:
    # Prepare
    site.path("P002", "pre", "dwi", "mask").unlink()
    cfg = make_cfg(data={"require_masks": True})
    # Execute
    report = site.check(cfg)
    # Assert
    issue = find_issue(report, "no_mask", "error", patient="P002", file=site.rel("P002", "pre", "dwi", "mask"))
    assert "require_masks" in issue.message


def test_second_rater_geometry_mismatch_is_a_warning(site, find_issue) -> None:
    # Prepare
    site.write(make_mask("t2w", origin=(0.0, -5.0, 0.0)), "P001", "pre", "t2w", kind="mask_rater2")
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "rater2_geometry_mismatch", "warning", patient="P001",
               file=site.rel("P001", "pre", "t2w", "mask_rater2"))
    assert report.ok


@pytest.mark.parametrize("fast", [False, True], ids=["pixels", "headers-only"])
def test_fast_mode_still_checks_geometry(site, find_issue, fast) -> None:
    # Prepare: a geometry fault (header) and an empty mask (pixels)
    site.write(make_mask("t2w", origin=(-5.0, 0.0, 0.0)), "P001", "pre", "t2w", kind="mask")
    site.write(make_mask("t2w", value=0), "P002", "pre", "t2w", kind="mask")
    # Execute
    report = site.check(read_pixels=not fast)
    # Assert
    find_issue(report, "geometry_mismatch", "error", patient="P001")
    assert ("empty_mask" in report.codes()) is (not fast)
