"""Image operations of the site's preprocessing: N4, denoising, resampling, normalisation,
discretisation, mask placement and largest-tumour slice extraction (SimpleITK + NumPy).

Pure functions on images and arrays, with no cache or file layout: :mod:`client.preprocess` runs
them per volume and keeps the results. Runs at the hospital.

Pipeline for one volume (:func:`client.preprocess.preprocess_volume`)
---------------------------------------------------
1. **Mask.** The volume's own reference mask; without one, the mask of another sequence of the same
   patient and timepoint (first available in ``cfg.data.mask_fallback``), resampled *in physical
   space* onto this image's grid (linear interpolation of the 0/1 mask, then threshold 0.5) after a
   geometry check (directions agree, physical extents overlap substantially; otherwise the volume
   fails with ``"mask geometry incompatible: ..."``; the next fallback is tried first). An own mask
   whose grid differs from its image's beyond ``check.geometry_tolerance`` goes through the same
   check and resampling. No mask anywhere (or none of its own with ``data.require_masks``): status
   ``no_mask``. Mask values > 0 are tumour.
2. **N4 bias-field correction** (:func:`n4_correct`): fitted on an image shrunk by
   ``n4.shrink_factor`` with an Otsu foreground mask, then evaluated at full resolution with
   ``GetLogBiasFieldAsImage(full_res_image)``: ``corrected = image / exp(log_bias)``. The shrink is
   per axis: an axis is shrunk only down to ``shrink_factor x`` the finest spacing, so the thick
   slice direction of a 0.7 x 0.7 x 4 mm volume is not shrunk (see :func:`n4_shrink_factors`).
3. **Denoising** (optional, :func:`denoise`): CurvatureFlow or GradientAnisotropicDiffusion.
4. **Resampling** (optional) to ``spacing_mm`` (image linear, mask linear + threshold 0.5). It is done
   here, before normalisation, so the discrete grey levels are not smeared by interpolation.
5. **Normalisation** (:func:`normalise`): clip at the volume's ``clip_percentiles`` and map
   linearly to 0-255 (float32).
6. **Slice, crop, resize** (:func:`extract_slice`): the axial slice with the largest tumour area
   (``slice_index`` indexes axis 0 of ``sitk.GetArrayFromImage``, i.e. z; ties -> lowest z), a square
   crop (in mm) around the tumour's in-plane bounding box, resized to ``slice_size`` (image
   bilinear, mask nearest).
7. **Discretisation** (:func:`discretise`) into ``bins`` grey levels kept on the 0-255 scale, applied
   last (after the bilinear resize) so the cached slice holds at most ``bins`` distinct values.
   Values are the bins' *lower edges*: ``floor(x * bins / 256) * 256 / bins`` (rounded up to an
   integer when ``bins`` does not divide 256, which keeps it idempotent), so 0 stays 0 and, for
   ``bins=64``, the levels are 0, 4, ..., 252.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from shared.config import PreprocessConfig

logger = logging.getLogger(__name__)


class NoMaskError(ValueError):
    """The volume has no mask of its own and no usable mask of another sequence exists."""


class MaskGeometryError(ValueError):
    """A mask cannot be placed on the image's grid (directions differ or the volumes do not overlap)."""


@dataclass
class SliceResult:
    """One preprocessed volume: its largest-tumour slice, cropped and resized.

    Attributes
    ----------
    image : ndarray of uint8, shape (S, S)
        Grey levels on the 0-255 scale, at most ``bins`` distinct values.
    mask : ndarray of uint8, shape (S, S)
        Tumour mask, 0/1.
    slice_index : int
        Index along axis 0 (z) of ``sitk.GetArrayFromImage`` of the volume the slice was taken from
        (after the optional resampling to ``spacing_mm``).
    tumour_area_px : int
        Tumour voxels in that slice, before the crop.
    crop_box : tuple of int
        ``(row0, col0, row1, col1)`` on the slice's (y, x) voxel grid, end-exclusive. It may extend
        beyond the slice (those pixels are zero padding).
    spacing : tuple of float
        ``(x, y, z)`` spacing in mm of the grid the slice was taken from.
    crop_mm : float
        Side of the square crop in mm.
    mask_source : str
        ``"own"`` or the sequence whose mask was resampled onto this volume.
    """

    image: np.ndarray
    mask: np.ndarray
    slice_index: int
    tumour_area_px: int
    crop_box: tuple[int, int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_mm: float = 0.0
    mask_source: str = "own"
    mask_path: str = ""


# --------------------------------------------------------------------------- image helpers


def _as_float3d(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Return a scalar 3-D float32 image (a 2-D image becomes one slice)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "expected a scalar volume")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ValueError(f"{what} is {image.GetDimension()}-D; expected a 3-D volume")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """Otsu foreground (1) vs background (0) mask, restricted to positive voxels (N4 needs log)."""
    img = _as_float3d(image)
    fg = sitk.OtsuThreshold(img, 0, 1, 128)
    fg = sitk.And(fg, sitk.Cast(img > 0, sitk.sitkUInt8))
    if not np.any(sitk.GetArrayViewFromImage(fg)):
        fg = sitk.Cast(img > 0, sitk.sitkUInt8)
    return fg


def n4_shrink_factors(image: sitk.Image, shrink_factor: int, min_size: int = 4, *,
                      fit_spacing_mm: float | None = None) -> list[int]:
    """Per-axis shrink factors for the N4 fit.

    Default (``fit_spacing_mm`` None): each axis is shrunk towards ``shrink_factor x`` the finest
    spacing but never by more than ``shrink_factor``. With ``fit_spacing_mm`` the fit grid is chosen
    in physical terms instead: each axis is shrunk to about that spacing (a 0.43 mm in-plane series
    by 16 for 7 mm, a 0.7 mm one by 10), whatever its native resolution. Either way an axis is never
    shrunk below ``min_size`` voxels, and an axis already that coarse (the slice direction of a
    typical anisotropic MRI) is not shrunk.
    """
    spacing = image.GetSpacing()
    size = image.GetSize()
    out = []
    for sp, n in zip(spacing, size, strict=True):
        if fit_spacing_mm is None:
            k = max(1, min(int(shrink_factor), int(round(shrink_factor * min(spacing) / sp))))
        else:
            k = max(1, int(round(float(fit_spacing_mm) / sp)))
        k = max(1, min(k, n // min_size))
        out.append(k)
    return out


def _n4_filter(iterations: Iterable[int], convergence_threshold: float) -> sitk.N4BiasFieldCorrectionImageFilter:
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations([int(i) for i in iterations])
    f.SetConvergenceThreshold(float(convergence_threshold))
    return f


def _prepare_n4(image: sitk.Image, mask: sitk.Image | None) -> tuple[sitk.Image, sitk.Image]:
    img = _as_float3d(image)
    if mask is None:
        fg = foreground_mask(img)
    else:
        fg = sitk.Cast(_as_float3d(mask, "mask") > 0, sitk.sitkUInt8)
        fg.CopyInformation(img)
        fg = sitk.And(fg, sitk.Cast(img > 0, sitk.sitkUInt8))
    return img, fg


def n4_correct(
    image: sitk.Image,
    *,
    shrink_factor: int = 4,
    iterations: Iterable[int] = (50, 40, 30),
    convergence_threshold: float = 1e-4,
    mask: sitk.Image | None = None,
    fit_threads: int | None = 1,
    fit_spacing_mm: float | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """N4 bias-field correction fitted on a shrunken image, applied at full resolution.

    Parameters
    ----------
    image : sitk.Image
        Scalar 3-D volume (any pixel type).
    shrink_factor : int
        The fit runs on the image shrunk by up to this factor per axis (:func:`n4_shrink_factors`).
    iterations : sequence of int
        Maximum iterations per fitting level (one entry per level).
    convergence_threshold : float
    mask : sitk.Image, optional
        Voxels used for the fit (same grid as ``image``); default the Otsu foreground.
    fit_threads : int or None
        ITK threads for the fit (the global default is set for its duration and restored). N4's
        fit is not bit-reproducible across thread counts (~1e-6 in the log field), so a fixed
        count makes the cache identical whatever the worker count or machine; the fit runs on
        the small shrunken image, where threads gain little. None keeps the ITK default.
    fit_spacing_mm : float, optional
        Fit on a grid of about this spacing (mm) instead of a fixed shrink factor
        (:func:`n4_shrink_factors`).

    Returns
    -------
    corrected : sitk.Image
        float32, ``image / bias``.
    bias : sitk.Image
        float32 multiplicative bias field (``exp`` of N4's log bias field) on the full grid.
    """
    img, fg = _prepare_n4(image, mask)
    if not np.any(sitk.GetArrayViewFromImage(fg)):
        logger.warning("N4 skipped: no positive foreground voxels")
        ones = sitk.Image(img.GetSize(), sitk.sitkFloat32) + 1.0
        ones.CopyInformation(img)
        return img, ones
    factors = n4_shrink_factors(img, shrink_factor, fit_spacing_mm=fit_spacing_mm)
    if any(k > 1 for k in factors):
        small, small_fg = sitk.Shrink(img, factors), sitk.Shrink(fg, factors)
    else:
        small, small_fg = img, fg
    corrector = _n4_filter(iterations, convergence_threshold)
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if fit_threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(fit_threads))
    try:
        corrector.Execute(small, small_fg)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    log_bias = corrector.GetLogBiasFieldAsImage(img)
    bias = sitk.Cast(sitk.Exp(log_bias), sitk.sitkFloat32)
    corrected = sitk.Cast(sitk.Divide(img, bias), sitk.sitkFloat32)
    return corrected, bias


def n4_correct_full_resolution(
    image: sitk.Image,
    *,
    iterations: Iterable[int] = (50, 40, 30),
    convergence_threshold: float = 1e-4,
    mask: sitk.Image | None = None,
    **_: Any,
) -> tuple[sitk.Image, sitk.Image]:
    """The naive baseline: N4 fitted on the full-resolution image (``Execute`` on the full grid).

    Same returns as :func:`n4_correct`; extra keyword arguments (``shrink_factor``) are ignored.
    """
    img, fg = _prepare_n4(image, mask)
    if not np.any(sitk.GetArrayViewFromImage(fg)):
        ones = sitk.Image(img.GetSize(), sitk.sitkFloat32) + 1.0
        ones.CopyInformation(img)
        return img, ones
    corrector = _n4_filter(iterations, convergence_threshold)
    corrected = sitk.Cast(corrector.Execute(img, fg), sitk.sitkFloat32)
    bias = sitk.Cast(sitk.Exp(corrector.GetLogBiasFieldAsImage(img)), sitk.sitkFloat32)
    return corrected, bias


def denoise(image: sitk.Image, method: str = "none", *, iterations: int = 5, time_step: float = 0.0625,
            conductance: float = 1.0) -> sitk.Image:
    """Optional edge-preserving smoothing.

    ``curvature_flow`` is ``sitk.CurvatureFlow``; ``anisotropic`` is
    ``GradientAnisotropicDiffusion`` with ``conductance`` (keyword, default 1.0). ITK's anisotropic
    diffusion is unstable for ``time_step > min_spacing / 2**(dim+1)`` (it scales by the image
    spacing); the time step is capped there (logged at debug level).
    """
    if method == "none":
        return image
    img = _as_float3d(image)
    if method == "curvature_flow":
        return sitk.CurvatureFlow(img, timeStep=float(time_step), numberOfIterations=int(iterations))
    if method == "anisotropic":
        limit = min(img.GetSpacing()) / 2 ** (img.GetDimension() + 1)
        step = float(time_step)
        if step > limit:
            logger.debug("anisotropic diffusion: time step %.4g capped at the stable %.4g", step, limit)
            step = limit * 0.99
        f = sitk.GradientAnisotropicDiffusionImageFilter()
        f.SetTimeStep(step)
        f.SetNumberOfIterations(int(iterations))
        f.SetConductanceParameter(float(conductance))
        return f.Execute(img)
    raise ValueError(f"unknown denoise method {method!r}; allowed: none, curvature_flow, anisotropic")


def resample_to_spacing(image: sitk.Image, spacing: Iterable[float], *, interpolator: int = sitk.sitkLinear,
                        default_value: float = 0.0) -> sitk.Image:
    """Resample onto a grid with ``spacing`` (x, y, z) mm covering the same physical extent."""
    new_sp = [float(s) for s in spacing]
    old_sp = image.GetSpacing()
    size = image.GetSize()
    new_size = [max(1, int(round(n * s / ns))) for n, s, ns in zip(size, old_sp, new_sp, strict=True)]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    # keep the outer edge of the first voxel in place: centre moves by (new - old) / 2 along each axis
    shift = direction @ ((np.asarray(new_sp) - np.asarray(old_sp)) / 2.0)
    origin = tuple(float(v) for v in np.asarray(image.GetOrigin()) + shift)
    return sitk.Resample(image, new_size, sitk.Transform(), interpolator, origin, new_sp, image.GetDirection(),
                         default_value, image.GetPixelID())


def normalise(image: sitk.Image, clip_percentiles: tuple[float, float] = (0.5, 99.5)) -> sitk.Image:
    """Clip at the volume's percentiles and map linearly to 0-255 (float32, same geometry).

    A constant volume maps to all zeros.
    """
    img = _as_float3d(image) if image.GetDimension() == 3 else sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    lo, hi = np.percentile(arr, [float(clip_percentiles[0]), float(clip_percentiles[1])])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        out = np.zeros_like(arr, dtype=np.float32)
    else:
        out = ((np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.float32)
    res = sitk.GetImageFromArray(out)
    res.CopyInformation(img)
    return res


def discretise(array: np.ndarray, bins: int) -> np.ndarray:
    """Quantise values on the 0-255 scale into ``bins`` levels, kept on that scale (uint8).

    Each value becomes its bin's lower edge rounded up to an integer,
    ``ceil(floor(x * bins / 256) * 256 / bins)`` (exact edges when ``bins`` divides 256: for 64 bins
    0, 4, ..., 252); input is clipped to [0, 255] first. At most ``bins`` distinct values, 0 stays 0,
    and the mapping is idempotent.
    """
    if not 2 <= int(bins) <= 256:
        raise ValueError(f"bins must be in 2..256, got {bins}")
    x = np.clip(np.asarray(array, dtype=np.float64), 0.0, 255.0)
    idx = np.floor(x * bins / 256.0)
    return np.ceil(idx * (256.0 / bins) - 1e-9).astype(np.uint8)


# --------------------------------------------------------------------------- masks and geometry


def largest_slice(mask_zyx: np.ndarray) -> tuple[int, int]:
    """Index along axis 0 of the slice with the largest mask area, and that area in voxels.

    Ties go to the lowest index. Raises ValueError on an empty mask.
    """
    m = np.asarray(mask_zyx)
    if m.ndim != 3:
        raise ValueError(f"expected a (z, y, x) mask, got shape {m.shape}")
    areas = (m > 0).reshape(m.shape[0], -1).sum(axis=1)
    if areas.size == 0 or int(areas.max()) == 0:
        raise ValueError("the mask is empty")
    z = int(np.argmax(areas))  # first maximum = lowest z
    return z, int(areas[z])


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (min, max) of the image's voxels, outer edges included."""
    size = image.GetSize()
    corners = []
    for bits in range(2 ** image.GetDimension()):
        idx = [(-0.5 if not (bits >> d) & 1 else n - 0.5) for d, n in enumerate(size)]
        corners.append(image.TransformContinuousIndexToPhysicalPoint(idx))
    c = np.asarray(corners)
    return c.min(axis=0), c.max(axis=0)


def check_mask_geometry(mask: sitk.Image, image: sitk.Image, *, min_overlap: float = 0.5,
                        direction_tolerance: float = 0.05) -> None:
    """Raise :class:`MaskGeometryError` unless ``mask`` can be resampled onto ``image``'s grid.

    The direction matrices must agree element-wise within ``direction_tolerance`` (0.05 ~ 3 deg) and
    the physical bounding boxes must overlap by at least ``min_overlap`` of the smaller one's volume.
    """
    d_m = np.asarray(mask.GetDirection())
    d_i = np.asarray(image.GetDirection())
    if d_m.shape != d_i.shape:
        raise MaskGeometryError(f"mask geometry incompatible: mask is {mask.GetDimension()}-D, "
                                f"image {image.GetDimension()}-D")
    diff = float(np.abs(d_m - d_i).max())
    if diff > direction_tolerance:
        raise MaskGeometryError(
            f"mask geometry incompatible: orientations differ (max direction-cosine difference {diff:.3f} "
            f"> {direction_tolerance})")
    lo_m, hi_m = physical_bounds(mask)
    lo_i, hi_i = physical_bounds(image)
    inter = np.clip(np.minimum(hi_m, hi_i) - np.maximum(lo_m, lo_i), 0, None).prod()
    vol = min(float(np.prod(hi_m - lo_m)), float(np.prod(hi_i - lo_i)))
    frac = float(inter / vol) if vol > 0 else 0.0
    if frac < min_overlap:
        raise MaskGeometryError(
            f"mask geometry incompatible: physical extents overlap by {frac:.0%} (< {min_overlap:.0%}); "
            f"mask spans {np.round(lo_m, 1).tolist()}..{np.round(hi_m, 1).tolist()} mm, "
            f"image {np.round(lo_i, 1).tolist()}..{np.round(hi_i, 1).tolist()} mm")


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-3) -> bool:
    """True when ``a`` and ``b`` share size, and spacing/origin/direction within ``tolerance`` (relative)."""
    if a.GetSize() != b.GetSize():
        return False
    sp_a, sp_b = np.asarray(a.GetSpacing()), np.asarray(b.GetSpacing())
    if not np.allclose(sp_a, sp_b, rtol=tolerance, atol=0):
        return False
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance * float(sp_a.max()) + 1e-6):
        return False
    return bool(np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tolerance))


def resample_mask(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Resample a 0/1 mask onto ``reference``'s grid in physical space (linear, then >= 0.5), uint8."""
    m = sitk.Cast(sitk.Cast(mask, sitk.sitkFloat32) > 0, sitk.sitkFloat32)
    r = sitk.Resample(m, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(r >= 0.5, sitk.sitkUInt8)


def mask_onto_image(mask: sitk.Image, image: sitk.Image, *, tolerance: float = 1e-3, min_overlap: float = 0.5,
                    direction_tolerance: float = 0.05) -> sitk.Image:
    """Put ``mask`` on ``image``'s grid: as is when the grids match, else checked + resampled."""
    if mask.GetDimension() == 2:
        mask = sitk.JoinSeries(mask)
    if same_grid(mask, image, tolerance):
        out = sitk.Cast(sitk.Cast(mask, sitk.sitkFloat32) > 0, sitk.sitkUInt8)
        out.CopyInformation(image)
        return out
    check_mask_geometry(mask, image, min_overlap=min_overlap, direction_tolerance=direction_tolerance)
    return resample_mask(mask, image)


# --------------------------------------------------------------------------- slice extraction


def _sample(slice2d: np.ndarray, rows: np.ndarray, cols: np.ndarray, order: int) -> np.ndarray:
    h, w = slice2d.shape
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    out = ndimage.map_coordinates(slice2d, [rr, cc], order=order, mode="nearest")
    inside = (rr >= -0.5) & (rr < h - 0.5) & (cc >= -0.5) & (cc < w - 0.5)
    return np.where(inside, out, 0)


def _crop_start(lo: int, hi: int, n: int, extent: int) -> int:
    """Start of a window of ``n`` voxels centred on [lo, hi), clamped into the image (or covering it)."""
    start = int(math.floor((lo + hi) / 2.0 - n / 2.0 + 0.5))
    a, b = min(0, extent - n), max(0, extent - n)
    return int(min(max(start, a), b))


def extract_slice(image: sitk.Image, mask: sitk.Image, cfg: PreprocessConfig) -> SliceResult:
    """The largest-tumour axial slice, cropped square around the tumour and resized.

    Parameters
    ----------
    image : sitk.Image
        3-D volume on the 0-255 scale (:func:`normalise`).
    mask : sitk.Image
        Tumour mask on the same grid.
    cfg : PreprocessConfig
        Uses ``crop_margin``, ``min_crop_mm``, ``slice_size`` and ``bins``.

    The crop side is ``max(larger bbox side x (1 + 2 x crop_margin), min_crop_mm)`` in mm, i.e.
    ``crop_margin x larger side`` of context on each side; it is square in mm (so possibly not in
    voxels when x and y spacings differ), centred on the bounding box, shifted to stay inside the
    slice where it fits and zero-padded where it does not. Image resized bilinearly, mask by
    nearest neighbour, then the image is discretised into ``cfg.bins`` levels.

    Raises
    ------
    ValueError
        If the grids differ or the mask is empty.
    """
    img = _as_float3d(image)
    if mask.GetSize() != img.GetSize():
        raise ValueError(f"mask size {mask.GetSize()} differs from image size {img.GetSize()}")
    arr = sitk.GetArrayViewFromImage(img)
    m = sitk.GetArrayViewFromImage(mask) > 0
    z, area = largest_slice(m)
    sl = np.asarray(arr[z], dtype=np.float32)
    ms = m[z]
    rows = np.flatnonzero(ms.any(axis=1))
    cols = np.flatnonzero(ms.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    sx, sy, sz = (float(s) for s in img.GetSpacing())
    side_mm = max(max((r1 - r0) * sy, (c1 - c0) * sx) * (1.0 + 2.0 * cfg.crop_margin), cfg.min_crop_mm)
    n_rows = max(1, int(round(side_mm / sy)))
    n_cols = max(1, int(round(side_mm / sx)))
    h, w = sl.shape
    row0 = _crop_start(r0, r1, n_rows, h)
    col0 = _crop_start(c0, c1, n_cols, w)
    size = cfg.slice_size
    rr = row0 - 0.5 + (np.arange(size) + 0.5) * (n_rows / size)
    cc = col0 - 0.5 + (np.arange(size) + 0.5) * (n_cols / size)
    out_img = _sample(sl, rr, cc, order=1)
    out_mask = _sample(ms.astype(np.float32), rr, cc, order=0)
    return SliceResult(
        image=discretise(out_img, cfg.bins),
        mask=(out_mask > 0.5).astype(np.uint8),
        slice_index=z,
        tumour_area_px=area,
        crop_box=(row0, col0, row0 + n_rows, col0 + n_cols),
        spacing=(sx, sy, sz),
        crop_mm=float(side_mm),
    )
