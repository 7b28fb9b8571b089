"""N4 bias-field correction, normalisation and discretisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from client.preprocess import (
    denoise,
    discretise,
    n4_correct,
    n4_correct_full_resolution,
    n4_shrink_factors,
    normalise,
    resample_to_spacing,
)

from .conftest import phantom


def _cov(arr: np.ndarray, region: np.ndarray) -> float:
    v = arr[region].astype(np.float64)
    return float(v.std() / v.mean())


@pytest.fixture(scope="module")
def biased() -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    return phantom((10, 48, 48), (0.8, 0.8, 3.0), bias_strength=0.3)


@pytest.fixture(scope="module")
def corrected(biased):
    img, _, _ = biased
    shrunk = n4_correct(img, shrink_factor=4, iterations=(30, 20))
    full = n4_correct_full_resolution(img, iterations=(30, 20))
    return shrunk, full


def test_n4_removes_a_known_bias_field(biased, corrected) -> None:
    img, region, _ = biased
    (corr, bias), _ = corrected
    before = _cov(sitk.GetArrayFromImage(img), region)
    after = _cov(sitk.GetArrayFromImage(corr), region)
    assert before > 0.1  # the field really is there
    assert after < before / 2, (before, after)


def test_n4_returns_float_corrected_and_multiplicative_bias_on_the_full_grid(biased, corrected) -> None:
    img, _, true_bias = biased
    (corr, bias), _ = corrected
    for out in (corr, bias):
        assert out.GetPixelID() == sitk.sitkFloat32
        assert out.GetSize() == img.GetSize() and out.GetSpacing() == img.GetSpacing()
    b = sitk.GetArrayFromImage(bias)
    assert b.min() > 0
    np.testing.assert_allclose(sitk.GetArrayFromImage(corr) * b, sitk.GetArrayFromImage(img), rtol=1e-4, atol=1e-3)
    # the estimated field follows the true one up to N4's arbitrary scale
    body = sitk.GetArrayFromImage(img) > 20
    assert np.corrcoef(b[body], true_bias[body])[0, 1] > 0.95


def test_shrunken_fit_is_close_to_the_full_resolution_fit(biased, corrected) -> None:
    img, region, _ = biased
    (corr, _), (full, _) = corrected
    a, f = sitk.GetArrayFromImage(corr), sitk.GetArrayFromImage(full)
    body = sitk.GetArrayFromImage(img) > 20
    assert np.corrcoef(a[body], f[body])[0, 1] > 0.98
    assert _cov(a, region) < 1.5 * _cov(f, region) + 0.01


def test_shrink_factors_leave_the_thick_slice_axis_alone() -> None:
    img = sitk.Image([96, 96, 12], sitk.sitkFloat32)
    img.SetSpacing((0.7, 0.7, 4.0))
    assert n4_shrink_factors(img, 4) == [4, 4, 1]
    iso = sitk.Image([64, 64, 64], sitk.sitkFloat32)
    assert n4_shrink_factors(iso, 4) == [4, 4, 4]
    tiny = sitk.Image([8, 64, 64], sitk.sitkFloat32)
    assert n4_shrink_factors(tiny, 4) == [2, 4, 4]  # at least 4 voxels left along each axis


def test_a_physical_fit_grid_shrinks_each_axis_to_about_that_spacing() -> None:
    clinical = sitk.Image([512, 512, 30], sitk.sitkFloat32)
    clinical.SetSpacing((0.43, 0.43, 4.0))
    assert n4_shrink_factors(clinical, 4, fit_spacing_mm=7.0) == [16, 16, 2]  # a 32 x 32 x 15 fit grid
    assert n4_shrink_factors(clinical, 4) == [4, 4, 1]  # the fixed factor: 128 x 128 x 30
    demo = sitk.Image([96, 96, 12], sitk.sitkFloat32)
    demo.SetSpacing((0.7, 0.7, 4.0))
    assert n4_shrink_factors(demo, 4, fit_spacing_mm=7.0) == [10, 10, 2]  # the same ~7 mm grid, other scanner
    assert n4_shrink_factors(demo, 4, fit_spacing_mm=50.0) == [24, 24, 3]  # never below 4 voxels per axis


def test_the_physical_fit_grid_still_removes_the_bias(biased, corrected) -> None:
    img, region, true_bias = biased
    (corr, _), _ = corrected
    coarse, bias = n4_correct(img, iterations=(30, 20), fit_spacing_mm=6.4)  # 8x in-plane here: 6 x 6 x 10
    a, c = sitk.GetArrayFromImage(corr), sitk.GetArrayFromImage(coarse)
    body = sitk.GetArrayFromImage(img) > 20
    assert np.corrcoef(a[body], c[body])[0, 1] > 0.99
    assert _cov(c, region) < _cov(sitk.GetArrayFromImage(img), region)


def test_n4_on_an_empty_image_is_a_no_op() -> None:
    img = sitk.Image([8, 8, 4], sitk.sitkFloat32)
    corr, bias = n4_correct(img)
    assert not sitk.GetArrayFromImage(corr).any() and np.all(sitk.GetArrayFromImage(bias) == 1)


@pytest.mark.parametrize("method", ["curvature_flow", "anisotropic"])
def test_denoise_reduces_noise_and_keeps_geometry(method: str, biased) -> None:
    img, region, _ = biased
    out = denoise(img, method, iterations=5, time_step=0.0625)
    assert out.GetSize() == img.GetSize() and out.GetOrigin() == img.GetOrigin()
    a, b = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(out)
    assert np.isfinite(b).all()
    assert np.abs(np.diff(b[region])).mean() < np.abs(np.diff(a[region])).mean()
    assert denoise(img, "none") is img


def test_resample_to_spacing_keeps_the_physical_extent() -> None:
    img = sitk.Image([32, 32, 6], sitk.sitkFloat32)
    img.SetSpacing((1.0, 1.0, 4.0))
    img.SetOrigin((-16.0, -16.0, 0.0))
    out = resample_to_spacing(img, (2.0, 2.0, 4.0))
    assert out.GetSize() == (16, 16, 6) and out.GetSpacing() == (2.0, 2.0, 4.0)
    # the outer edge of the first voxel stays in place
    assert out.GetOrigin()[0] - 1.0 == pytest.approx(img.GetOrigin()[0] - 0.5)


@pytest.mark.parametrize("pct", [(0.5, 99.5), (5.0, 95.0), (0.0, 100.0)])
def test_normalise_maps_the_percentiles_to_0_and_255(pct: tuple[float, float]) -> None:
    rng = np.random.default_rng(1)
    arr = rng.gamma(2.0, 50.0, size=(6, 20, 20)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.7, 4.0))
    out = normalise(img, pct)
    o = sitk.GetArrayFromImage(out)
    assert out.GetPixelID() == sitk.sitkFloat32 and out.GetSpacing() == img.GetSpacing()
    assert o.min() == 0.0 and o.max() == pytest.approx(255.0)
    lo, hi = np.percentile(arr, pct)
    assert np.all(o[arr <= lo] == 0) and np.allclose(o[arr >= hi], 255.0)
    inside = (arr > lo) & (arr < hi)
    np.testing.assert_allclose(o[inside], (arr[inside] - lo) / (hi - lo) * 255.0, rtol=1e-4, atol=1e-3)
    # the clipped fraction matches the requested percentiles
    assert np.mean(o == 0) == pytest.approx(pct[0] / 100, abs=0.005)


def test_normalise_constant_image_gives_zeros() -> None:
    img = sitk.GetImageFromArray(np.full((3, 4, 4), 7.0, np.float32))
    assert not sitk.GetArrayFromImage(normalise(img, (1, 99))).any()


@pytest.mark.parametrize("bins", [2, 7, 32, 64, 100, 256])
def test_discretise_yields_at_most_bins_levels_on_the_0_255_scale(bins: int) -> None:
    x = np.linspace(-10, 300, 10007)
    d = discretise(x, bins)
    assert d.dtype == np.uint8
    levels = np.unique(d)
    assert len(levels) <= bins and len(levels) >= bins - 1
    assert levels[0] == 0
    assert np.array_equal(discretise(d, bins), d)  # idempotent
    assert np.all(d <= np.clip(x, 0, 255) + 1)  # lower bin edges (rounded up)


def test_discretise_uses_lower_bin_edges() -> None:
    assert discretise(np.array([0, 3.9, 4, 130, 255]), 64).tolist() == [0, 0, 4, 128, 252]
    with pytest.raises(ValueError):
        discretise(np.zeros(3), 1)


def test_the_default_fit_grid_is_physical_and_a_shrink_factor_alone_keeps_the_fixed_factor() -> None:
    from shared.config import N4Config, RectalFLConfig

    default = N4Config()
    assert default.fit_spacing_mm == 7.0 and default.iterations == [20, 20, 20]
    legacy = N4Config.model_validate({"shrink_factor": 2})  # the demo's kind of config: the factor it names
    assert legacy.fit_spacing_mm is None and legacy.shrink_factor == 2
    both = N4Config.model_validate({"shrink_factor": 2, "fit_spacing_mm": 5})
    assert both.fit_spacing_mm == 5.0
    for n4 in (default, legacy, both):  # a dumped config (every key present) reloads to the same settings
        cfg = RectalFLConfig.model_validate({"preprocess": {"n4": n4.model_dump(mode="json")}})
        assert cfg.preprocess.n4 == n4
