"""Per-site preprocessing: from a site's MRI volumes to one cached 2-D largest-tumour slice per volume.

Everything here runs at the hospital; the cache never leaves the site.

Pipeline for one volume (:func:`preprocess_volume`)
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

The cache (:func:`preprocess_site`)
-----------------------------------
``CACHE_DIR/slices/<pid>/<timepoint>_<sequence>.npz``
    compressed; ``image`` uint8 (S, S), ``mask`` uint8 (S, S) 0/1, ``slice_index``,
    ``tumour_area_px`` (voxels of the chosen slice before the crop), ``mask_source``, ``spacing``
    (x, y, z mm of the grid the slice was taken from), ``crop_box``, ``source`` (image path, relative
    to the site folder), ``mask_path``, ``fingerprint``, ``input_signature``, ``seconds``.
``CACHE_DIR/slices/<pid>/<timepoint>_<sequence>.error.json``
    the record of a volume that failed (status ``error`` or ``no_mask``): its manifest row plus
    ``input_signature``. (Out-of-memory and dead-worker failures are not recorded, so a re-run
    retries them.) Writing either file removes the other.
``CACHE_DIR/manifest.csv``
    one row per volume (:data:`MANIFEST_COLUMNS`), rebuilt from the per-volume files at the end of
    each run and written atomically. It is removed at the start of a run that has work to do, so
    its presence means the cache is complete for the current data and configuration.

Every per-volume file is written atomically (temporary file + ``os.replace``) as soon as the
volume finishes, so an interrupted run loses only the volumes in flight. A re-run reuses a volume's
result -- a slice or a recorded failure -- when its config fingerprint (:func:`config_fingerprint`)
*and* its input signature (:func:`input_signature`: paths, sizes and modification times of the image
and of the candidate mask files) are unchanged, so fixing or re-exporting a file recomputes just
that volume; ``force=True`` recomputes everything.

Parallelism: ``workers > 1`` uses a spawn-context ``ProcessPoolExecutor``, each worker with
``cpus // workers`` ITK threads; the N4 *fit* always runs single-threaded (``n4_correct(fit_threads=1)``)
because ITK's N4 is not bit-reproducible across thread counts, which keeps the cache identical for
any worker count or machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from shared.config import PreprocessConfig, RectalFLConfig

if TYPE_CHECKING:
    from shared.cohort import VolumeRecord

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 1
"""Bumped when the pipeline's output changes for the same configuration (part of the fingerprint)."""

MANIFEST_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "timepoint",
    "sequence",
    "status",
    "slice_index",
    "tumour_area_px",
    "mask_source",
    "error",
    "path",
    "seconds",
    "source",
    "fingerprint",
)
"""Columns of ``manifest.csv``. ``status`` is ok | error | no_mask; ``mask_source`` own | <sequence> |
none; ``error`` is empty when ok; ``path`` is the npz path relative to the cache folder (empty when
not ok); ``slice_index`` is -1 and ``tumour_area_px`` 0 when not ok; ``seconds`` is the compute time
of the run that produced the result; ``source`` the image path relative to the site folder."""

ProgressFn = Callable[[int, int, str], None]


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


def n4_shrink_factors(image: sitk.Image, shrink_factor: int, min_size: int = 4) -> list[int]:
    """Per-axis shrink factors for the N4 fit.

    Each axis is shrunk towards ``shrink_factor x`` the finest spacing but never by more than
    ``shrink_factor``, never below ``min_size`` voxels, and an axis already that coarse (the slice
    direction of a typical anisotropic MRI) is not shrunk.
    """
    spacing = image.GetSpacing()
    size = image.GetSize()
    target = shrink_factor * min(spacing)
    out = []
    for sp, n in zip(spacing, size, strict=True):
        k = max(1, min(int(shrink_factor), int(round(target / sp))))
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
    factors = n4_shrink_factors(img, shrink_factor)
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


# --------------------------------------------------------------------------- one volume


def _rel(path: Path | str | None, root: Path) -> str:
    if path is None:
        return ""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(p)


def mask_candidates(record: VolumeRecord, cfg: RectalFLConfig, site_dir: Path) -> list[tuple[Path, str]]:
    """The masks that may serve ``record``: ``[(its own mask, "own")]`` or the fallbacks in order.

    No fallback when ``cfg.data.require_masks`` is true (as in :func:`shared.cohort.find_fallback_mask`).
    """
    if record.mask_path is not None:
        return [(Path(record.mask_path), "own")]
    if cfg.data.require_masks:
        return []
    from shared.cohort import find_volume

    out: list[tuple[Path, str]] = []
    for seq in cfg.data.mask_fallback:
        if seq == record.sequence:
            continue
        p = find_volume(site_dir, record.patient_id, record.timepoint, seq, kind="mask")
        if p is not None:
            out.append((Path(p), seq))
    return out


def _no_mask_error(record: VolumeRecord, cfg: RectalFLConfig, site_dir: Path) -> NoMaskError:
    if cfg.data.require_masks:
        return NoMaskError(f"{_rel(record.image_path, site_dir)}: no mask of its own (data.require_masks is true, "
                           "so no other sequence's mask is used)")
    others = [s for s in cfg.data.mask_fallback if s != record.sequence]
    return NoMaskError(f"{_rel(record.image_path, site_dir)}: no mask of its own and none of "
                       f"{', '.join(others) or 'no other sequence'} at {record.timepoint} for patient "
                       f"{record.patient_id}")


def _load_mask_for(image: sitk.Image, record: VolumeRecord, cfg: RectalFLConfig, site_dir: Path,
                   *, min_overlap: float, direction_tolerance: float) -> tuple[sitk.Image, str, Path]:
    from shared.cohort import CohortError, read_image

    cands = mask_candidates(record, cfg, site_dir)
    if not cands:
        raise _no_mask_error(record, cfg, site_dir)
    reasons = []
    tol = cfg.check.geometry_tolerance
    for path, source in cands:
        try:
            mask = _as_float3d(read_image(path), f"mask {_rel(path, site_dir)}")
        except (CohortError, ValueError) as exc:
            if source == "own":
                raise
            reasons.append(f"{_rel(path, site_dir)} ({source}): unreadable: {exc}")
            continue
        try:
            on_grid = mask_onto_image(mask, image, tolerance=tol, min_overlap=min_overlap,
                                      direction_tolerance=direction_tolerance)
        except MaskGeometryError as exc:
            if source == "own":
                raise MaskGeometryError(f"{_rel(path, site_dir)} vs {_rel(record.image_path, site_dir)}: {exc}") from None
            reasons.append(f"{_rel(path, site_dir)} ({source}): {exc}")
            continue
        if not np.any(sitk.GetArrayViewFromImage(on_grid)):
            msg = (f"mask {_rel(path, site_dir)} is empty" if source == "own" else
                   f"mask {_rel(path, site_dir)} ({source}) is empty on the grid of {_rel(record.image_path, site_dir)}")
            if source == "own":
                raise ValueError(msg)
            reasons.append(msg)
            continue
        return on_grid, source, path
    if all("mask geometry incompatible" in r for r in reasons):
        raise MaskGeometryError(
            f"{_rel(record.image_path, site_dir)}: mask geometry incompatible with every fallback mask: "
            + "; ".join(r.replace("mask geometry incompatible: ", "") for r in reasons))
    raise ValueError(f"{_rel(record.image_path, site_dir)}: no usable fallback mask: " + "; ".join(reasons))


def preprocess_volume(record: VolumeRecord, cfg: RectalFLConfig, site_dir: Path, *, min_overlap: float = 0.5,
                      direction_tolerance: float = 0.05) -> SliceResult:
    """Run the whole pipeline (module docstring) on one volume.

    Parameters
    ----------
    record : VolumeRecord
        From :func:`shared.cohort.iter_volumes`.
    cfg : RectalFLConfig
        Uses ``preprocess``, ``data.mask_fallback`` and ``check.geometry_tolerance`` (grid match).
    site_dir : Path
        The site folder (fallback masks are looked up there).
    min_overlap, direction_tolerance : float
        Geometry check for a mask on another grid (:func:`check_mask_geometry`).

    Raises
    ------
    NoMaskError
        No own mask and no fallback mask exists.
    MaskGeometryError
        The mask cannot be placed on the image ("mask geometry incompatible").
    CohortError, ValueError, RuntimeError
        Unreadable files, empty masks, etc. (messages name the file).
    """
    from shared.cohort import read_image

    site_dir = Path(site_dir)
    pp = cfg.preprocess
    if not mask_candidates(record, cfg, site_dir):  # fail cheaply before reading anything
        raise _no_mask_error(record, cfg, site_dir)
    image = _as_float3d(read_image(Path(record.image_path)), f"image {record.image_path}")
    mask, source, mask_path = _load_mask_for(image, record, cfg, site_dir, min_overlap=min_overlap,
                                             direction_tolerance=direction_tolerance)
    if pp.n4.enabled:
        image, _ = n4_correct(image, shrink_factor=pp.n4.shrink_factor, iterations=pp.n4.iterations,
                              convergence_threshold=pp.n4.convergence_threshold)
    image = denoise(image, pp.denoise.method, iterations=pp.denoise.iterations, time_step=pp.denoise.time_step)
    if pp.spacing_mm is not None:
        image = resample_to_spacing(image, pp.spacing_mm)
        mask = resample_mask(mask, image)
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            raise ValueError(f"mask {_rel(mask_path, site_dir)} vanishes when resampled to {pp.spacing_mm} mm")
    image = normalise(image, pp.clip_percentiles)
    res = extract_slice(image, mask, pp)
    res.mask_source = source
    res.mask_path = _rel(mask_path, site_dir)
    return res


# --------------------------------------------------------------------------- the cache


def config_fingerprint(cfg: RectalFLConfig, *, min_overlap: float = 0.5, direction_tolerance: float = 0.05) -> str:
    """Hash of what determines a cached slice.

    The preprocess section (less ``workers``, which does not change results), ``data.mask_fallback``,
    ``check.geometry_tolerance`` (when a mask counts as on its image's grid), the geometry-check
    keywords and :data:`PIPELINE_VERSION`. (``data.require_masks`` acts through the input
    signature: it changes the candidate masks.)
    """
    pp = cfg.preprocess.model_dump(mode="json")
    pp.pop("workers", None)
    blob = json.dumps({"version": PIPELINE_VERSION, "preprocess": pp,
                       "mask_fallback": list(cfg.data.mask_fallback),
                       "geometry_tolerance": cfg.check.geometry_tolerance,
                       "min_overlap": float(min_overlap), "direction_tolerance": float(direction_tolerance)},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stat_entry(p: Path, root: Path | None) -> list[Any]:
    name = _rel(p, root) if root is not None else str(p)
    try:
        if p.is_dir():
            files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(p) if e.is_file())
            return [name, "dir", files]
        st = p.stat()
        return [name, st.st_size, st.st_mtime_ns]
    except OSError:
        return [name, "missing"]


def input_signature(record: VolumeRecord, candidates: list[tuple[Path, str]], site_dir: Path | None = None) -> str:
    """Hash of the inputs' paths (relative to ``site_dir`` when given), sizes and modification times:
    the image and every candidate mask (:func:`mask_candidates`)."""
    items = [_stat_entry(Path(record.image_path), site_dir)]
    items += [[src, *_stat_entry(p, site_dir)] for p, src in candidates]
    return hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()[:16]


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _safe_name(s: str) -> str:
    s = str(s)
    if _SAFE.match(s) and s not in (".", ".."):
        return s
    return re.sub(r"[^A-Za-z0-9._-]", "_", s).lstrip(".") + "-" + hashlib.sha1(s.encode()).hexdigest()[:8]


def _npz_rel(patient_id: str, timepoint: str, sequence: str) -> str:
    return f"slices/{_safe_name(patient_id)}/{timepoint}_{sequence}.npz"


def _err_rel(patient_id: str, timepoint: str, sequence: str) -> str:
    return f"slices/{_safe_name(patient_id)}/{timepoint}_{sequence}.error.json"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _row(record: VolumeRecord, site_dir: Path, **kw: Any) -> dict[str, Any]:
    row = {
        "patient_id": str(record.patient_id),
        "timepoint": str(record.timepoint),
        "sequence": str(record.sequence),
        "status": "ok",
        "slice_index": -1,
        "tumour_area_px": 0,
        "mask_source": "none",
        "error": "",
        "path": "",
        "seconds": 0.0,
        "source": _rel(record.image_path, site_dir),
        "fingerprint": "",
    }
    row.update(kw)
    return row


def _process_one(record: VolumeRecord, cfg: RectalFLConfig, site_dir: Path, cache_dir: Path, fingerprint: str,
                 signature: str, options: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one volume and persist its result (npz or error sidecar); return its manifest row."""
    t0 = time.perf_counter()
    pid, tp, seq = str(record.patient_id), str(record.timepoint), str(record.sequence)
    npz_rel, err_rel = _npz_rel(pid, tp, seq), _err_rel(pid, tp, seq)
    transient = False
    try:
        res = preprocess_volume(record, cfg, site_dir, **options)
    except NoMaskError as exc:
        status, error = "no_mask", str(exc)
    except MemoryError as exc:
        status, error, transient = "error", f"{_rel(record.image_path, site_dir)}: out of memory ({exc})", True
    except Exception as exc:  # a bad volume never stops the site
        msg = str(exc).strip() or type(exc).__name__
        src = _rel(record.image_path, site_dir)
        if src not in msg and Path(record.image_path).name not in msg:
            msg = f"{src}: {msg}"
        if not isinstance(exc, ValueError):  # CohortError, MaskGeometryError are ValueErrors
            msg = f"{msg} ({type(exc).__name__})"
        status, error = "error", msg
        logger.debug("volume %s %s/%s failed", pid, tp, seq, exc_info=True)
    else:
        seconds = time.perf_counter() - t0
        arrays = {
            "image": res.image.astype(np.uint8),
            "mask": res.mask.astype(np.uint8),
            "slice_index": np.int64(res.slice_index),
            "tumour_area_px": np.int64(res.tumour_area_px),
            "mask_source": np.str_(res.mask_source),
            "mask_path": np.str_(res.mask_path),
            "spacing": np.asarray(res.spacing, dtype=np.float64),
            "crop_box": np.asarray(res.crop_box, dtype=np.int64),
            "crop_mm": np.float64(res.crop_mm),
            "source": np.str_(_rel(record.image_path, site_dir)),
            "fingerprint": np.str_(fingerprint),
            "input_signature": np.str_(signature),
            "seconds": np.float64(seconds),
        }
        _atomic_write(cache_dir / npz_rel, lambda fh: np.savez_compressed(fh, **arrays))
        _unlink(cache_dir / err_rel)
        return _row(record, site_dir, slice_index=res.slice_index, tumour_area_px=res.tumour_area_px,
                    mask_source=res.mask_source, path=npz_rel, seconds=round(seconds, 4), fingerprint=fingerprint)
    seconds = time.perf_counter() - t0
    logger.warning("%s %s/%s: %s: %s", pid, tp, seq, status, error)
    row = _row(record, site_dir, status=status, error=error, seconds=round(seconds, 4), fingerprint=fingerprint)
    _unlink(cache_dir / npz_rel)
    if not transient:
        payload = {**row, "input_signature": signature}
        _atomic_write(cache_dir / err_rel, lambda fh: fh.write(json.dumps(payload, indent=1)), mode="w")
    return row


def _cached_row(record: VolumeRecord, site_dir: Path, cache_dir: Path, fingerprint: str,
                signature: str) -> dict[str, Any] | None:
    pid, tp, seq = str(record.patient_id), str(record.timepoint), str(record.sequence)
    npz = cache_dir / _npz_rel(pid, tp, seq)
    if npz.is_file():
        try:
            with np.load(npz) as z:
                if str(z["fingerprint"]) != fingerprint or str(z["input_signature"]) != signature:
                    return None
                return _row(record, site_dir, slice_index=int(z["slice_index"]),
                            tumour_area_px=int(z["tumour_area_px"]), mask_source=str(z["mask_source"]),
                            path=_npz_rel(pid, tp, seq), seconds=round(float(z["seconds"]), 4),
                            fingerprint=fingerprint)
        except Exception:  # unreadable or partial: recompute
            logger.info("cache entry %s unreadable; recomputing", npz)
            return None
    err = cache_dir / _err_rel(pid, tp, seq)
    if err.is_file():
        try:
            d = json.loads(err.read_text())
        except (OSError, ValueError):
            return None
        if d.get("fingerprint") != fingerprint or d.get("input_signature") != signature:
            return None
        return _row(record, site_dir, status=d.get("status", "error"), error=d.get("error", ""),
                    seconds=float(d.get("seconds", 0.0)), fingerprint=fingerprint)
    return None


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _label(record: VolumeRecord) -> str:
    return f"{record.patient_id} {record.timepoint}/{record.sequence}"


def preprocess_site(
    site_dir: Path | str,
    cache_dir: Path | str,
    cfg: RectalFLConfig,
    *,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    force: bool = False,
    min_overlap: float = 0.5,
    direction_tolerance: float = 0.05,
) -> pd.DataFrame:
    """Preprocess every volume of a site into its (resumable) cache and return the manifest.

    Parameters
    ----------
    site_dir : Path
        The site folder (site data contract, :mod:`shared.cohort`).
    cache_dir : Path
        Cache folder (created); layout in the module docstring.
    cfg : RectalFLConfig
    workers : int, optional
        Processes (default ``cfg.preprocess.workers``). 1 runs in this process; more use a
        spawn-context ``ProcessPoolExecutor`` where each worker gets ``cpus // workers`` ITK threads.
    progress : callable, optional
        ``progress(done, total, label)`` after each volume (cached ones first). An exception it raises
        (e.g. KeyboardInterrupt) stops the run; finished volumes stay in the cache.
    force : bool
        Recompute every volume even when its cached result is current.
    min_overlap, direction_tolerance : float
        Geometry check for fallback masks (:func:`check_mask_geometry`).

    Returns
    -------
    pandas.DataFrame
        The manifest (:data:`MANIFEST_COLUMNS`), also written to ``cache_dir/manifest.csv``.

    Raises
    ------
    CohortError
        The site folder itself is unusable (from :func:`shared.cohort.iter_volumes`).
    """
    from shared.cohort import iter_volumes

    site_dir, cache_dir = Path(site_dir), Path(cache_dir)
    n_workers = max(1, int(workers if workers is not None else cfg.preprocess.workers))
    records = list(iter_volumes(site_dir, cfg))
    options = {"min_overlap": float(min_overlap), "direction_tolerance": float(direction_tolerance)}
    fp = config_fingerprint(cfg, **options)
    total = len(records)
    rows: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, VolumeRecord, str]] = []
    done = 0
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cache_dir / "manifest.csv"
    for i, rec in enumerate(records):
        sig = input_signature(rec, mask_candidates(rec, cfg, site_dir), site_dir)
        row = None if force else _cached_row(rec, site_dir, cache_dir, fp, sig)
        if row is None:
            todo.append((i, rec, sig))
        else:
            rows[i] = row
    if todo:
        _unlink(manifest_path)  # the cache is incomplete until this run finishes
    logger.info("preprocessing %s: %d volume(s), %d cached, %d to compute with %d worker(s)", site_dir, total,
                total - len(todo), len(todo), n_workers)
    for i in sorted(rows):
        done += 1
        if progress is not None:
            progress(done, total, _label(records[i]) + " (cached)")

    if todo and (n_workers == 1 or len(todo) == 1):
        for i, rec, sig in todo:
            rows[i] = _process_one(rec, cfg, site_dir, cache_dir, fp, sig, options)
            done += 1
            if progress is not None:
                progress(done, total, _label(rec))
    elif todo:
        n = min(n_workers, len(todo))
        threads = max(1, _available_cpus() // n)
        ex = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,))
        try:
            futures = {ex.submit(_process_one, rec, cfg, site_dir, cache_dir, fp, sig, options): (i, rec)
                       for i, rec, sig in todo}
            for fut in as_completed(futures):
                i, rec = futures[fut]
                try:
                    rows[i] = fut.result()
                except BrokenProcessPool as exc:
                    rows[i] = _row(rec, site_dir, status="error", fingerprint=fp,
                                   error=f"{_rel(rec.image_path, site_dir)}: worker process died ({exc}); re-run to retry")
                done += 1
                if progress is not None:
                    progress(done, total, _label(rec))
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)  # volumes in flight finish and are persisted
            raise
        ex.shutdown(wait=True)

    manifest = pd.DataFrame([rows[i] for i in range(total)], columns=list(MANIFEST_COLUMNS))
    manifest = manifest.astype({"slice_index": "int64", "tumour_area_px": "int64", "seconds": "float64"})
    _atomic_write(manifest_path, lambda fh: manifest.to_csv(fh, index=False), mode="w")
    counts = manifest["status"].value_counts().to_dict()
    logger.info("preprocessed %s -> %s: %s", site_dir, cache_dir, counts)
    return manifest


def load_manifest(cache_dir: Path | str) -> pd.DataFrame:
    """Read ``cache_dir/manifest.csv`` (ids and text columns as strings, empty text as "")."""
    path = Path(cache_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no preprocessing manifest at {path}: run `rectalfl site preprocess` "
                                "(an interrupted run leaves none until it is completed)")
    text_cols = ["patient_id", "timepoint", "sequence", "status", "mask_source", "error", "path", "source",
                 "fingerprint"]
    df = pd.read_csv(path, dtype=dict.fromkeys(text_cols, str), keep_default_na=False, na_values=[])
    for c in ("slice_index", "tumour_area_px"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").fillna(-1).astype("int64")
    if "seconds" in df:
        df["seconds"] = pd.to_numeric(df["seconds"], errors="coerce").astype("float64")
    return df


def load_slice(cache_dir: Path | str, patient_id: str, timepoint: str, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the cached ``(image, mask)`` uint8 (S, S) arrays of one volume."""
    path = Path(cache_dir) / _npz_rel(str(patient_id), str(timepoint), str(sequence))
    if not path.is_file():
        raise FileNotFoundError(f"no cached slice for {patient_id} {timepoint}/{sequence} at {path} "
                                "(see manifest.csv for its status)")
    with np.load(path) as z:
        return z["image"].copy(), z["mask"].copy()


def load_slice_info(cache_dir: Path | str, patient_id: str, timepoint: str, sequence: str) -> dict[str, Any]:
    """Everything stored for one cached volume (arrays and metadata) as a dict."""
    path = Path(cache_dir) / _npz_rel(str(patient_id), str(timepoint), str(sequence))
    with np.load(path) as z:
        return {k: (z[k].item() if z[k].ndim == 0 else z[k].copy()) for k in z.files}
