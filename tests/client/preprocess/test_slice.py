"""Largest-tumour slice choice, cropping, and masks borrowed from another sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from client.preprocess import (
    MaskGeometryError,
    NoMaskError,
    SliceResult,
    check_mask_geometry,
    discretise,
    extract_slice,
    largest_slice,
    preprocess_volume,
    resample_mask,
)
from shared.cohort import iter_volumes
from shared.config import PreprocessConfig

from .conftest import GRIDS, ORIGIN, TUMOUR_Z, Site, site_config, to_image, tumour_arrays


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 7), st.integers(1, 6), st.integers(1, 6)),
              elements=st.integers(0, 1)))
def test_largest_slice_is_the_argmax_of_the_area_with_lowest_z_on_ties(mask: np.ndarray) -> None:
    areas = mask.sum(axis=(1, 2))
    if areas.max() == 0:
        with pytest.raises(ValueError):
            largest_slice(mask)
        return
    z, area = largest_slice(mask)
    assert area == areas.max()
    assert z == min(np.flatnonzero(areas == areas.max()))


def test_largest_slice_ties_and_labels() -> None:
    m = np.zeros((5, 4, 4), np.uint8)
    m[1, :2, :2] = 1
    m[3, 2:, 2:] = 2  # any non-zero label counts
    assert largest_slice(m) == (1, 4)
    with pytest.raises(ValueError):
        largest_slice(np.zeros((3, 4, 4)))


def _volume_with_tumour_at(z: int, shape_zyx=(7, 40, 50), spacing=(1.0, 1.5, 3.0)) -> tuple[sitk.Image, sitk.Image]:
    nz, ny, nx = shape_zyx
    arr = np.zeros(shape_zyx, np.float32)
    for k in range(nz):
        arr[k] = 10.0 * (k + 1)  # each slice has its own grey value
    mask = np.zeros(shape_zyx, np.uint8)
    mask[:, 18:24, 20:24] = 1
    mask[z, 16:26, 18:26] = 1  # largest in-plane area at z
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    # a non-identity (flipped) direction must not change which array index is reported
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(img)
    return img, m


@pytest.mark.parametrize("z", [0, 3, 6])
def test_extract_slice_indexes_axis_0_of_getarrayfromimage(z: int) -> None:
    img, mask = _volume_with_tumour_at(z)
    cfg = PreprocessConfig(slice_size=32, bins=256, crop_margin=0.5, min_crop_mm=10.0)
    res = extract_slice(img, mask, cfg)
    assert isinstance(res, SliceResult)
    assert res.slice_index == z
    assert res.tumour_area_px == int(sitk.GetArrayFromImage(mask)[z].sum()) == 80
    assert res.image.shape == res.mask.shape == (32, 32)
    assert res.image.dtype == np.uint8 and res.mask.dtype == np.uint8
    # the pixels come from that slice (crop fits inside, so no padding)
    assert set(np.unique(res.image)) == {int(discretise(np.array([10.0 * (z + 1)]), 256)[0])}


def test_crop_is_square_in_mm_centred_and_at_least_min_crop_mm() -> None:
    img, mask = _volume_with_tumour_at(3)
    # bbox 10 rows x 8 cols at (1.5 mm, 1.0 mm) -> 15 mm x 8 mm; margin 0.5 -> 30 mm side
    res = extract_slice(img, mask, PreprocessConfig(slice_size=30, crop_margin=0.5, min_crop_mm=10.0))
    r0, c0, r1, c1 = res.crop_box
    assert res.crop_mm == pytest.approx(30.0)
    assert (r1 - r0) * 1.5 == pytest.approx(30.0) and (c1 - c0) * 1.0 == pytest.approx(30.0)
    assert 0 <= r0 and r1 <= 40 and 0 <= c0 and c1 <= 50
    # the tumour sits in the middle of the output
    rows, cols = np.nonzero(res.mask)
    assert abs(rows.mean() - 14.5) < 1.5 and abs(cols.mean() - 14.5) < 1.5
    # a tiny margin falls back to min_crop_mm
    res2 = extract_slice(img, mask, PreprocessConfig(slice_size=30, crop_margin=0.0, min_crop_mm=24.0))
    assert res2.crop_mm == pytest.approx(24.0)


def test_crop_at_the_border_is_clamped_or_zero_padded() -> None:
    arr = np.full((3, 20, 20), 200.0, np.float32)
    mask = np.zeros((3, 20, 20), np.uint8)
    mask[1, 0:3, 0:3] = 1  # tumour in the corner
    img = sitk.GetImageFromArray(arr)
    m = sitk.GetImageFromArray(mask)
    cfg = PreprocessConfig(slice_size=16, crop_margin=0.5, min_crop_mm=10.0)
    res = extract_slice(img, m, cfg)
    assert res.crop_box == (0, 0, 10, 10)  # shifted inside, not padded
    assert res.image.min() > 0
    big = extract_slice(img, m, PreprocessConfig(slice_size=16, crop_margin=0.5, min_crop_mm=40.0))
    r0, c0, r1, c1 = big.crop_box
    assert (r1 - r0, c1 - c0) == (40, 40) and r0 <= 0 and r1 >= 20  # covers the slice, padded
    assert (big.image == 0).mean() > 0.5  # the padding is zeros
    assert big.mask.sum() > 0


def _record(site: Site, pid: str, tp: str, seq: str, cfg):
    return next(r for r in iter_volumes(site.root, cfg)
                if (r.patient_id, r.timepoint, r.sequence) == (pid, tp, seq))


@pytest.mark.parametrize(("target", "donor"), [("dwi", "t2w"), ("t2w", "dwi")])
def test_mask_from_another_sequence_is_resampled_in_physical_space(tiny_site: Site, target: str, donor: str) -> None:
    tiny_site.remove_mask("P001", "post", target)
    cfg = site_config()
    rec = _record(tiny_site, "P001", "post", target, cfg)
    assert rec.mask_path is None
    res = preprocess_volume(rec, cfg, tiny_site.root)
    assert res.mask_source == donor
    assert res.slice_index == TUMOUR_Z["P001"]["post"]
    # the same volume with its own mask picks the same slice and about the same area
    _, own = tumour_arrays(target, TUMOUR_Z["P001"]["post"], (4.0, -3.0))
    assert res.tumour_area_px == pytest.approx(int(own[res.slice_index].sum()), rel=0.35)
    assert res.mask.sum() > 0


def test_resample_mask_coarse_to_fine_keeps_the_tumour_in_place() -> None:
    _, coarse = tumour_arrays("dwi", 2, (4.0, -3.0))
    _, fine = tumour_arrays("t2w", 2, (4.0, -3.0))
    out = sitk.GetArrayFromImage(resample_mask(to_image(coarse, "dwi"), to_image(fine.astype(np.float32), "t2w")))
    assert out.dtype == np.uint8 and out.shape == fine.shape
    assert largest_slice(out)[0] == 2
    dice = 2 * (out & fine).sum() / (out.sum() + fine.sum())
    assert dice > 0.8


def test_geometry_check_rejects_far_away_or_rotated_masks() -> None:
    img = to_image(np.zeros((6, 16, 16), np.float32), "dwi")
    ok = to_image(np.zeros((6, 32, 32), np.uint8), "t2w")
    check_mask_geometry(ok, img)
    far = to_image(np.zeros((6, 32, 32), np.uint8), "t2w", origin=(500.0, 0.0, 0.0))
    with pytest.raises(MaskGeometryError, match="mask geometry incompatible"):
        check_mask_geometry(far, img)
    rotated = to_image(np.zeros((6, 32, 32), np.uint8), "t2w", direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(MaskGeometryError, match="orientations differ"):
        check_mask_geometry(rotated, img)


def test_incompatible_fallback_mask_is_an_error_not_a_crash(tiny_site: Site) -> None:
    cfg = site_config()
    tiny_site.remove_mask("P007", "pre", "dwi")
    _, m = tumour_arrays("t2w", 4, (-5.0, 6.0))
    tiny_site.write(to_image(m, "t2w", origin=(400.0, 400.0, 0.0)), "P007", "pre", "t2w", "mask")
    rec = _record(tiny_site, "P007", "pre", "dwi", cfg)
    with pytest.raises(MaskGeometryError, match="mask geometry incompatible"):
        preprocess_volume(rec, cfg, tiny_site.root)


def test_no_mask_anywhere_raises_no_mask(tiny_site: Site) -> None:
    for seq in ("t2w", "dwi"):
        tiny_site.remove_mask("P001", "pre", seq)
    cfg = site_config()
    with pytest.raises(NoMaskError):
        preprocess_volume(_record(tiny_site, "P001", "pre", "dwi", cfg), cfg, tiny_site.root)


def test_require_masks_disables_the_fallback(tiny_site: Site) -> None:
    tiny_site.remove_mask("P001", "pre", "dwi")
    cfg = site_config()
    cfg.data.require_masks = True
    with pytest.raises(NoMaskError, match="require_masks"):
        preprocess_volume(_record(tiny_site, "P001", "pre", "dwi", cfg), cfg, tiny_site.root)


def test_resampling_to_spacing_changes_the_grid_not_the_slice(tiny_site: Site) -> None:
    cfg = site_config(spacing_mm=(0.5, 0.5, 4.0))
    res = preprocess_volume(_record(tiny_site, "P007", "post", "dwi", cfg), cfg, Path(tiny_site.root))
    assert res.spacing == (0.5, 0.5, 4.0)
    assert res.slice_index == TUMOUR_Z["P007"]["post"]
    assert res.image.shape == (24, 24)
    assert len(np.unique(res.image)) <= 32


def test_origin_constant_is_the_fixture_origin() -> None:  # guards the fixture's assumptions
    assert ORIGIN[0] + GRIDS["t2w"]["size"][0] * GRIDS["t2w"]["spacing"][0] == 16.0
    assert GRIDS["dwi"]["size"][0] * GRIDS["dwi"]["spacing"][0] == GRIDS["t2w"]["size"][0] * GRIDS["t2w"]["spacing"][0]
