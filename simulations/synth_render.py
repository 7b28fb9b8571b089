"""Scanner profiles, pelvic anatomy in physical space and its rendering on each sequence's grid.

The scene
---------
Each patient's anatomy is defined ONCE, in millimetres, in a patient frame centred on the rectum
(x to the patient's left, y posterior, z cranial; world = patient frame + a per-patient offset).
Sizes are fractions of the reference field of view, ``H = 0.5 * min(shape_x, shape_y) * 0.7`` mm
in plane and ``Hz = 0.5 * shape_z * 4`` mm through plane (``SynthConfig.shape`` is given at the
reference 0.7 x 0.7 x 4 mm grid; ``SynthConfig.fov_mm`` sets that field of view instead, e.g. a
clinical 512 x 512 x 30 series over 220 x 220 x 120 mm), so the scene fills the volume whatever its size. Structures,
from the outside in: body outline (air outside), subcutaneous fat, a muscle layer, pelvic fat,
obturator and gluteal muscles, the bony pelvis (cortex ring around marrow: lateral walls and the
sacrum), the bladder and prostate/uterus anteriorly, the mesorectal fascia and fat with a few
vessels and lymph nodes, the rectum (wall and a gel- or air-filled lumen) and a lobulated tumour
(a sum of a few Gaussian blobs thresholded at 0.5, centred on the rectal wall and confined to a
ring around the rectal axis whose outer radius follows the T stage and CRM).

Each timepoint is imaged on its own slightly oblique grid (rotation of 2-8 degrees about a random
axis, a non-zero origin); T2W and CE-T1W share it, DWI and ADC use a coarser in-plane grid (half
the voxels, twice the spacing) covering the same field of view. Every grid samples the same
physical scene, so the tumour masks of all sequences agree in physical space.

Acquisition
-----------
``clean tissue value (0-1) ** gamma[seq] * scale[seq] + offset``, times the smooth multiplicative
bias field ``B = exp(bias_strength * P / max|P|)`` (``P`` a random quadratic polynomial in the
normalised grid coordinates, shared by all sequences of a timepoint, max taken over the T2W grid),
DWI blurred (EPI point-spread, 0.6 voxel), then Rician noise ``|S + n1 + i n2|`` with
``n ~ N(0, noise * scale[seq])`` (x ``dwi_noise_factor`` for DWI), rounded to int16. ADC (in
1e-6 mm^2/s) is a calibrated map: ``value * adc_gain``, blurred like DWI, ``+ N(0, adc_noise)``
inside the body, no bias field (B = 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from simulations.synth_clinical import PatientLatent

__all__ = [
    "REFERENCE_SPACING",
    "SCANNER_PROFILES",
    "TISSUES",
    "Anatomy",
    "BiasField",
    "Grid",
    "ScannerProfile",
    "image_effects",
    "make_grids",
    "reference_fov",
    "render_timepoint",
    "sample_anatomy",
    "spacing_scale",
]

REFERENCE_SPACING: tuple[float, float, float] = (0.7, 0.7, 4.0)
"""The grid at which ``SynthConfig.shape`` is given (mm)."""


def reference_fov(shape: tuple[int, int, int], fov_mm: tuple[float, float, float] | None = None) -> np.ndarray:
    """The scene's field of view (x, y, z) in mm: ``fov_mm``, or ``shape`` x :data:`REFERENCE_SPACING`."""
    if fov_mm is None:
        return np.asarray(shape, dtype=np.float64) * np.asarray(REFERENCE_SPACING)
    return np.asarray(fov_mm, dtype=np.float64)


def spacing_scale(shape: tuple[int, int, int], fov_mm: tuple[float, float, float] | None = None) -> np.ndarray:
    """Factor (x, y, z) applied to every scanner profile's spacing so ``shape`` voxels cover ``fov_mm``
    (exactly 1 when ``fov_mm`` is None)."""
    if fov_mm is None:
        return np.ones(3)
    return reference_fov(shape, fov_mm) / (np.asarray(shape, dtype=np.float64) * np.asarray(REFERENCE_SPACING))
EDGE_MM = 0.6
"""Width of the soft (partial-volume) edge of every structure."""
TUMOUR_THRESHOLD = 0.5
MIN_MASK_VOXELS = 10
"""Every tumour mask (on every grid) has at least this many voxels."""
INT16_MAX = 32767


@dataclass(frozen=True)
class ScannerProfile:
    """How one scanner family images the scene.

    Attributes
    ----------
    field_strength_t : float
        Nominal field strength (documentation only).
    inplane_mm, slice_mm : float
        T2W/CE-T1W in-plane pixel spacing and slice thickness (DWI/ADC: twice the in-plane spacing).
    scale : mapping
        Per-sequence intensity scale (arbitrary scanner units) of a tissue value of 1.
    offset : float
        Constant added to T2W/DWI/CE-T1W before the bias field (scanner baseline).
    gamma : mapping
        Per-sequence contrast exponent applied to the 0-1 tissue value (site contrast differences).
    bias_strength : float
        Maximum of ``|log B|`` over the T2W field of view (B = multiplicative bias field).
    noise : float
        Rician noise sigma as a fraction of ``scale[seq]``.
    dwi_noise_factor : float
        Extra noise factor of DWI (EPI at high b-value has a lower SNR).
    adc_gain : float
        Multiplicative calibration of ADC (b-value choice, vendor fit).
    adc_noise : float
        Gaussian noise of ADC, 1e-6 mm^2/s.
    """

    name: str
    field_strength_t: float
    inplane_mm: float
    slice_mm: float
    scale: Mapping[str, float]
    offset: float
    gamma: Mapping[str, float]
    bias_strength: float
    noise: float
    dwi_noise_factor: float
    adc_gain: float
    adc_noise: float

    def as_dict(self) -> dict[str, object]:
        """Plain-JSON form (for ``cohort.json``)."""
        return {
            "name": self.name, "field_strength_t": self.field_strength_t, "inplane_mm": self.inplane_mm,
            "slice_mm": self.slice_mm, "scale": dict(self.scale), "offset": self.offset,
            "gamma": dict(self.gamma), "bias_strength": self.bias_strength, "noise": self.noise,
            "dwi_noise_factor": self.dwi_noise_factor, "adc_gain": self.adc_gain, "adc_noise": self.adc_noise,
        }


def _profile(name: str, **kw: object) -> ScannerProfile:
    kw["scale"] = MappingProxyType(dict(kw["scale"]))  # type: ignore[arg-type]
    kw["gamma"] = MappingProxyType(dict(kw["gamma"]))  # type: ignore[arg-type]
    return ScannerProfile(name=name, **kw)  # type: ignore[arg-type]


SCANNER_PROFILES: Mapping[str, ScannerProfile] = MappingProxyType({
    # 3 T, fine in-plane grid, unit contrast, mild bias, good SNR.
    "siemens_like": _profile(
        "siemens_like", field_strength_t=3.0, inplane_mm=0.70, slice_mm=3.5,
        scale={"t2w": 800.0, "dwi": 400.0, "ce_t1w": 900.0}, offset=0.0,
        gamma={"t2w": 1.00, "dwi": 1.00, "ce_t1w": 1.00},
        bias_strength=0.20, noise=0.025, dwi_noise_factor=1.6, adc_gain=1.00, adc_noise=60.0),
    # 3 T, large intensity scale with a baseline offset, harder T2W contrast, softer DWI.
    "ge_like": _profile(
        "ge_like", field_strength_t=3.0, inplane_mm=0.80, slice_mm=4.0,
        scale={"t2w": 2500.0, "dwi": 1500.0, "ce_t1w": 3000.0}, offset=40.0,
        gamma={"t2w": 1.15, "dwi": 0.90, "ce_t1w": 1.10},
        bias_strength=0.30, noise=0.030, dwi_noise_factor=1.6, adc_gain=1.04, adc_noise=70.0),
    # 3 T, small intensity scale, thinnest slices, flatter T2W contrast, harder DWI.
    "philips_like": _profile(
        "philips_like", field_strength_t=3.0, inplane_mm=0.65, slice_mm=3.0,
        scale={"t2w": 400.0, "dwi": 250.0, "ce_t1w": 500.0}, offset=10.0,
        gamma={"t2w": 0.85, "dwi": 1.10, "ce_t1w": 0.90},
        bias_strength=0.25, noise=0.030, dwi_noise_factor=1.5, adc_gain=0.96, adc_noise=70.0),
    # 1.5 T, coarse grid and thick slices, strong bias, low SNR (the usual external site).
    "legacy_1p5t": _profile(
        "legacy_1p5t", field_strength_t=1.5, inplane_mm=0.90, slice_mm=5.0,
        scale={"t2w": 600.0, "dwi": 300.0, "ce_t1w": 700.0}, offset=0.0,
        gamma={"t2w": 1.25, "dwi": 0.80, "ce_t1w": 1.20},
        bias_strength=0.45, noise=0.050, dwi_noise_factor=2.0, adc_gain=1.08, adc_noise=110.0),
})
"""The four scanner families of ``SiteSpec.scanner``."""

# Tissue values: t2w/dwi/ce_t1w on a 0-1 scale (before the scanner's gamma and scale), adc in
# 1e-6 mm^2/s. DWI is b~800 with fat suppression, CE-T1W is fat-suppressed post-contrast.
TISSUES: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "air": {"t2w": 0.0, "dwi": 0.0, "ce_t1w": 0.0, "adc": 0.0},
    "fat": {"t2w": 0.85, "dwi": 0.06, "ce_t1w": 0.12, "adc": 150.0},
    "muscle": {"t2w": 0.22, "dwi": 0.14, "ce_t1w": 0.30, "adc": 1400.0},
    "cortex": {"t2w": 0.04, "dwi": 0.03, "ce_t1w": 0.04, "adc": 300.0},
    "marrow": {"t2w": 0.62, "dwi": 0.07, "ce_t1w": 0.18, "adc": 400.0},
    "bladder": {"t2w": 0.97, "dwi": 0.05, "ce_t1w": 0.06, "adc": 2900.0},
    "prostate": {"t2w": 0.42, "dwi": 0.25, "ce_t1w": 0.45, "adc": 1300.0},
    "fascia": {"t2w": 0.15, "dwi": 0.08, "ce_t1w": 0.25, "adc": 1200.0},
    "vessel": {"t2w": 0.08, "dwi": 0.04, "ce_t1w": 0.90, "adc": 1800.0},
    "wall": {"t2w": 0.30, "dwi": 0.22, "ce_t1w": 0.55, "adc": 1500.0},
    "lumen_gel": {"t2w": 0.95, "dwi": 0.25, "ce_t1w": 0.08, "adc": 2700.0},
    "lumen_air": {"t2w": 0.03, "dwi": 0.02, "ce_t1w": 0.03, "adc": 0.0},
    "tumour": {"t2w": 0.50, "dwi": 0.85, "ce_t1w": 0.75, "adc": 850.0},
    "node": {"t2w": 0.42, "dwi": 0.65, "ce_t1w": 0.50, "adc": 1000.0},
    "fibrosis": {"t2w": 0.14, "dwi": 0.12, "ce_t1w": 0.32, "adc": 1350.0},
})


# --------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """An image grid: size (x, y, z), spacing (mm), origin (mm) and row-major 3x3 direction."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @functools.cached_property
    def _coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._compute_coords()

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (mm) of the voxel centres, three float32 arrays shaped (z, y, x) (cached; do not modify)."""
        return self._coords

    def _compute_coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nx, ny, nz = self.size
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        i = np.arange(nx) * self.spacing[0]
        j = np.arange(ny) * self.spacing[1]
        k = np.arange(nz) * self.spacing[2]
        out = []
        for a in range(3):
            c = (self.origin[a] + k[:, None, None] * d[a, 2] + j[None, :, None] * d[a, 1]
                 + i[None, None, :] * d[a, 0])
            out.append(c.astype(np.float32))
        return out[0], out[1], out[2]

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box (mm) holding every voxel centre."""
        d = np.asarray(self.direction).reshape(3, 3)
        ext = np.asarray(self.spacing) * (np.asarray(self.size) - 1)
        corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * ext
        pts = np.asarray(self.origin) + corners @ d.T
        return pts.min(0), pts.max(0)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels that may lie in the world box ``[lo, hi]`` (None if none)."""
        d = np.asarray(self.direction).reshape(3, 3)
        corners = np.array([[a[0], b[1], c[2]] for a in (lo, hi) for b in (lo, hi) for c in (lo, hi)])
        idx = ((corners - np.asarray(self.origin)) @ d) / np.asarray(self.spacing)
        i0 = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
        i1 = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, np.asarray(self.size))
        if np.any(i0 >= i1):
            return None
        return slice(int(i0[2]), int(i1[2])), slice(int(i0[1]), int(i1[1])), slice(int(i0[0]), int(i1[0]))

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (z, y, x) on this grid."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def as_dict(self) -> dict[str, list[float] | list[int]]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


def _rotation(rng: np.random.Generator, min_deg: float = 2.0, max_deg: float = 8.0) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(min_deg, max_deg))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def make_grids(shape: tuple[int, int, int], profile: ScannerProfile, centre: np.ndarray,
               rng: np.random.Generator, fov_mm: tuple[float, float, float] | None = None) -> tuple[Grid, Grid]:
    """The T2W/CE-T1W grid and the coarser DWI/ADC grid of one timepoint.

    Both are centred on ``centre`` (world mm) with the same random oblique direction and the same
    field of view; the DWI grid has half the in-plane voxels (at least 4) and the matching spacing.
    The profile's spacing is scaled by :func:`spacing_scale` (``fov_mm``: ``SynthConfig.fov_mm``).
    """
    nx, ny, nz = (int(s) for s in shape)
    rot = _rotation(rng)
    direction = tuple(float(v) for v in rot.ravel())
    sp = np.array([profile.inplane_mm, profile.inplane_mm, profile.slice_mm]) * spacing_scale(shape, fov_mm)
    size = np.array([nx, ny, nz])
    origin = centre - rot @ (sp * (size - 1) / 2.0)
    t2 = Grid((nx, ny, nz), tuple(float(v) for v in sp), tuple(float(v) for v in origin), direction)
    dsize = np.array([max(nx // 2, 4), max(ny // 2, 4), nz])
    dsp = sp * size / dsize
    dorigin = centre - rot @ (dsp * (dsize - 1) / 2.0)
    dwi = Grid(tuple(int(v) for v in dsize), tuple(float(v) for v in dsp),  # type: ignore[arg-type]
               tuple(float(v) for v in dorigin), direction)
    return t2, dwi


# --------------------------------------------------------------------------- bias field


@dataclass(frozen=True)
class BiasField:
    """Smooth multiplicative field ``B = exp(strength * P(u) / norm)`` in physical space.

    ``u`` are world coordinates relative to ``centre`` divided by ``half_extent`` (the T2W grid's
    half field of view); ``P`` a quadratic polynomial without constant term; ``norm`` = max|P| over
    the T2W grid, so ``max |log B| == strength`` there.
    """

    centre: tuple[float, float, float]
    half_extent: tuple[float, float, float]
    coeffs: tuple[float, ...]
    strength: float
    norm: float = 1.0

    def _poly(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        u = (x - self.centre[0]) / self.half_extent[0]
        v = (y - self.centre[1]) / self.half_extent[1]
        w = (z - self.centre[2]) / self.half_extent[2]
        c = self.coeffs
        return (c[0] * u + c[1] * v + c[2] * w + c[3] * u * u + c[4] * v * v + c[5] * w * w
                + c[6] * u * v + c[7] * u * w + c[8] * v * w)

    def log_field(self, grid: Grid) -> np.ndarray:
        """``log B`` on ``grid`` (float32, z, y, x)."""
        x, y, z = grid.coords()
        return (self.strength / self.norm * self._poly(x, y, z)).astype(np.float32)

    @classmethod
    def sample(cls, rng: np.random.Generator, grid: Grid, strength: float) -> BiasField:
        """A random field normalised on ``grid`` (the T2W grid of the timepoint)."""
        weights = np.array([1.0, 1.0, 0.5, 0.7, 0.7, 0.3, 0.5, 0.3, 0.3])
        coeffs = tuple(float(c) for c in rng.normal(size=9) * weights)
        d = np.asarray(grid.direction).reshape(3, 3)
        sp = np.asarray(grid.spacing)
        size = np.asarray(grid.size)
        centre = np.asarray(grid.origin) + d @ (sp * (size - 1) / 2.0)
        half = np.abs(d) @ (sp * size / 2.0)
        bf = cls(tuple(float(v) for v in centre), tuple(float(v) for v in half), coeffs, float(strength))
        norm = float(np.max(np.abs(bf._poly(*grid.coords()))))
        return cls(bf.centre, bf.half_extent, coeffs, float(strength), max(norm, 1e-12))


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Tumour:
    """Lobulated tumour: blobs (K x 3 centres, in-plane and z sigmas, weights) in the patient frame."""

    centres: np.ndarray
    sigma_xy: np.ndarray
    sigma_z: np.ndarray
    weights: np.ndarray
    rho_min: float
    rho_max: float
    anchor: np.ndarray

    def shrunk(self, g: float, min_sigma: float) -> Tumour:
        """The tumour scaled by the linear factor ``g`` about its anchor on the rectal wall."""
        return Tumour(self.anchor + g * (self.centres - self.anchor), np.maximum(self.sigma_xy * g, min_sigma),
                      np.maximum(self.sigma_z * g, min_sigma), self.weights, self.rho_min, self.rho_max,
                      self.anchor)


@dataclass(frozen=True)
class Anatomy:
    """One patient's pelvis in the patient frame (mm). See the module docstring."""

    H: float
    Hz: float
    world_offset: np.ndarray
    rect_drift: tuple[float, float]
    r_outer: float
    r_lumen: float
    lumen: str
    ellipses: tuple[tuple[str, tuple[float, ...]], ...]
    meso: tuple[float, float, float, float]
    vessels: np.ndarray
    nodes_xyz: np.ndarray
    nodes_radius: np.ndarray
    nodes_malignant: np.ndarray
    tumour: Tumour
    tissue: Mapping[str, Mapping[str, float]]
    texture_k: np.ndarray
    texture_phase: np.ndarray
    fat_k: np.ndarray
    fat_phase: np.ndarray


def _rff(rng: np.random.Generator, n: int, lam_lo: float, lam_hi: float) -> tuple[np.ndarray, np.ndarray]:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2.0 * math.pi / rng.uniform(lam_lo, lam_hi, size=(n, 1)))
    return k.astype(np.float32), rng.uniform(0, 2 * math.pi, size=n).astype(np.float32)


def sample_anatomy(rng: np.random.Generator, shape: tuple[int, int, int], row: Mapping[str, object],
                   latent: PatientLatent, fov_mm: tuple[float, float, float] | None = None) -> Anatomy:
    """Draw one patient's anatomy (shared by both timepoints and all sequences).

    The T stage sets how far the tumour may grow beyond the wall (T2: confined to the wall, T3:
    0.08 H beyond, T4: 0.16 H); a positive CRM lets it reach the mesorectal fascia; the N stage
    sets the number of malignant lymph nodes (N0: none, N1: 1-3, N2: 4-6) next to 0-2 benign ones.
    """
    fx, fy, fz = (float(v) for v in reference_fov(shape, fov_mm))
    H = 0.5 * min(fx, fy)
    Hz = 0.5 * fz

    def j(s: float = 0.06) -> float:
        return float(1.0 + rng.normal(0.0, s))

    world_offset = np.array([rng.uniform(-15, 15), rng.uniform(20, 60), rng.uniform(-160, -80)])
    male = row.get("sex", "M") == "M"
    ell: list[tuple[str, tuple[float, ...]]] = []
    bcy, ba, bb = -0.15 * H * j(), 1.05 * H * j(0.05), 0.95 * H * j(0.05)
    ell.append(("fat", (0.0, bcy, ba, bb)))  # body outline: subcutaneous fat
    ell.append(("muscle", (0.0, bcy, ba * 0.88, bb * 0.86)))  # muscle layer
    ell.append(("fat", (0.0, bcy, ba * 0.76, bb * 0.74)))  # pelvic fat
    for side in (-1.0, 1.0):
        ell.append(("muscle", (side * 0.55 * H * j(), 0.45 * H * j(), 0.30 * H * j(), 0.20 * H * j())))  # gluteus
        ell.append(("muscle", (side * 0.62 * H * j(), -0.20 * H * j(), 0.13 * H * j(), 0.32 * H * j())))  # obturator
        bx, by, ra, rb = side * 0.84 * H * j(0.04), -0.20 * H * j(), 0.15 * H * j(), 0.30 * H * j()
        ell.append(("cortex", (bx, by, ra, rb)))  # ischium / acetabulum
        ell.append(("marrow", (bx, by, ra * 0.7, rb * 0.8)))
    sy, sa, sb = 0.47 * H * j(0.05), 0.30 * H * j(), 0.075 * H * j()
    ell.append(("cortex", (0.0, sy, sa, sb)))  # sacrum / coccyx
    ell.append(("marrow", (0.0, sy, sa * 0.85, sb * 0.55)))
    organ = (0.0, -0.55 * H * j(), 0.26 * H * j(), 0.18 * H * j())
    ell.append(("bladder" if rng.random() < 0.5 else "prostate" if male else "muscle", organ))
    meso = (0.0, 0.02 * H * j(), 0.36 * H * j(), 0.30 * H * j())
    r_outer = 0.17 * H * j(0.08)
    wall = 0.07 * H * j(0.1)
    lumen = "lumen_gel" if rng.random() < 0.6 else "lumen_air"
    r_lumen = (r_outer - wall) * (1.0 if lumen == "lumen_gel" else 0.6)
    drift = (float(rng.normal(0, 0.04 * H)), float(rng.normal(0, 0.04 * H)))

    # vessels: thin tubes along z in the mesorectal fat (flow voids on T2W, bright on CE-T1W)
    nv = int(rng.integers(3, 7))
    ang = rng.uniform(0, 2 * math.pi, nv)
    rad = rng.uniform(0.65, 0.9, nv)
    vessels = np.stack([meso[0] + rad * meso[2] * np.cos(ang), meso[1] + rad * meso[3] * np.sin(ang),
                        np.full(nv, 0.02 * H) * rng.uniform(0.8, 1.4, nv)], axis=1)

    # lymph nodes in the mesorectal fat
    n_stage = str(row.get("n_stage", "N1"))
    n_mal = 0 if n_stage == "N0" else int(rng.integers(1, 4)) if n_stage == "N1" else int(rng.integers(4, 7))
    n_ben = int(rng.integers(0, 3))
    n_nodes = n_mal + n_ben
    ang = rng.uniform(0, 2 * math.pi, n_nodes)
    rad = rng.uniform(0.0, 1.0, n_nodes)
    rmin = (r_outer + 0.05 * H)
    nodes_xyz = np.stack([
        meso[0] + np.cos(ang) * (rmin + rad * (meso[2] * 0.85 - rmin)),
        meso[1] + np.sin(ang) * (rmin + rad * (meso[3] * 0.85 - rmin)),
        rng.uniform(-0.7, 0.7, n_nodes) * Hz], axis=1) if n_nodes else np.zeros((0, 3))
    nodes_malignant = np.array([True] * n_mal + [False] * n_ben, dtype=bool)
    nodes_radius = np.where(nodes_malignant, 0.06 * H * rng.uniform(0.8, 1.3, n_nodes),
                            0.035 * H * rng.uniform(0.8, 1.2, n_nodes))

    # tumour
    t_stage = str(row.get("t_stage", "T3"))
    beyond = {"T2": 0.0, "T3": 0.08 * H, "T4": 0.16 * H}.get(t_stage, 0.08 * H)
    rho_max = r_outer + beyond
    if int(row.get("crm", 0)):  # type: ignore[call-overload]
        rho_max = max(rho_max, min(meso[2], meso[3]))
    size = math.exp(0.2 * latent.size_z)
    theta0 = rng.uniform(0, 2 * math.pi)
    zt = rng.uniform(-0.25, 0.25) * Hz
    k = int(rng.integers(3, 6))
    sxy = 0.085 * H * size * rng.uniform(0.7, 1.0, k)
    sz = 0.32 * Hz * size * rng.uniform(0.7, 1.0, k)
    th = theta0 + np.concatenate([[0.0], rng.normal(0.0, 0.45, k - 1)])
    rr = r_outer - 0.5 * wall + rng.normal(0.0, 0.3 * wall, k) + (0.5 * sxy if beyond > 0 else 0.0)
    zz = zt + np.concatenate([[0.0], rng.normal(0.0, 0.5, k - 1)]) * sz
    cx = drift[0] * zz / Hz + rr * np.cos(th)
    cy = drift[1] * zz / Hz + rr * np.sin(th)
    weights = np.concatenate([[1.0], rng.uniform(0.55, 1.0, k - 1)])
    anchor = np.array([drift[0] * zt / Hz + (r_outer - 0.5 * wall) * math.cos(theta0),
                       drift[1] * zt / Hz + (r_outer - 0.5 * wall) * math.sin(theta0), zt])
    tumour = Tumour(np.stack([cx, cy, zz], axis=1), sxy, sz, weights, 0.35 * r_lumen, rho_max, anchor)

    tissue = {name: {s: v * float(math.exp(rng.normal(0.0, 0.04))) for s, v in vals.items()}
              for name, vals in TISSUES.items()}
    tk, tph = _rff(rng, 8, 0.25 * H * 0.3, 0.25 * H)
    fk, fph = _rff(rng, 6, 0.15 * H, 0.5 * H)
    return Anatomy(H=H, Hz=Hz, world_offset=world_offset, rect_drift=drift, r_outer=r_outer, r_lumen=r_lumen,
                   lumen=lumen, ellipses=tuple(ell), meso=meso, vessels=vessels, nodes_xyz=nodes_xyz,
                   nodes_radius=nodes_radius, nodes_malignant=nodes_malignant, tumour=tumour,
                   tissue=MappingProxyType(tissue), texture_k=tk, texture_phase=tph, fat_k=fk, fat_phase=fph)


# --------------------------------------------------------------------------- latent -> image effects


@dataclass(frozen=True)
class ImageEffects:
    """How the latent responsiveness shows in the images (all already scaled by ``signal``).

    Attributes
    ----------
    volume_fraction : float
        Post/pre tumour volume, ``clip(exp(-1.1 - 0.6 s r + 0.5 e0), 0.01, 1.3)``.
    fibrosis : float
        Fibrotic fraction of the residual tumour on post T2W (x0.7 on CE-T1W), ``sigmoid(-0.3 + 0.75 s r + 0.8 e1)``.
    dwi_loss : float
        Loss of restricted diffusion in the residual (post DWI/ADC), ``sigmoid(-0.3 + 0.75 s r + 0.8 e2)``.
    texture : float
        Pre T2W/CE-T1W tumour heterogeneity amplitude, ``0.10 exp(-0.15 s r + 0.2 e3)``.
    dwi_texture : float
        Pre DWI heterogeneity amplitude, ``0.12 exp(-0.2 s r + 0.2 e3)``.
    pre_dwi_gain, pre_adc_gain : float
        Pre DWI tumour signal ``x (1 + 0.05 s r)``, pre ADC ``x (1 - 0.05 s r)``.
    node_shrink : float
        Linear post/pre factor of malignant nodes.
    """

    volume_fraction: float
    fibrosis: float
    dwi_loss: float
    texture: float
    dwi_texture: float
    pre_dwi_gain: float
    pre_adc_gain: float
    node_shrink: float


_K_VOL = 0.6
_K_FIB = 0.75


def image_effects(latent: PatientLatent, signal: float) -> ImageEffects:
    """The image effects of ``latent`` at response-signal strength ``signal`` (0: none)."""
    s, r, e = float(signal), latent.r, latent.eps
    sr = s * r

    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    vf = float(np.clip(math.exp(-1.1 - _K_VOL * sr + 0.5 * e[0]), 0.01, 1.3))
    return ImageEffects(
        volume_fraction=vf,
        fibrosis=sig(-0.3 + _K_FIB * sr + 0.8 * e[1]),
        dwi_loss=sig(-0.3 + _K_FIB * sr + 0.8 * e[2]),
        texture=0.10 * math.exp(float(np.clip(-0.15 * sr, -1.5, 1.5)) + 0.2 * e[3]),
        dwi_texture=0.12 * math.exp(float(np.clip(-0.2 * sr, -1.5, 1.5)) + 0.2 * e[3]),
        pre_dwi_gain=float(np.clip(1.0 + 0.05 * sr, 0.7, 1.3)),
        pre_adc_gain=float(np.clip(1.0 - 0.05 * sr, 0.7, 1.3)),
        node_shrink=float(np.clip(vf ** (1.0 / 3.0) * 1.3 + 0.1 * e[4], 0.35, 1.0)),
    )


# --------------------------------------------------------------------------- rendering


def _clip01(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0.0, 1.0, out=a)


def _ellipse_alpha(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    d = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return _clip01(0.5 - (d - 1.0) * (min(a, b) / EDGE_MM))


def _rff_field(k: np.ndarray, ph: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(len(ph)):
        out += np.cos(k[i, 0] * x + k[i, 1] * y + k[i, 2] * z + ph[i])
    out *= math.sqrt(2.0 / len(ph))
    return out


def tumour_field(t: Tumour, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Sum of the tumour's Gaussian blobs (the tumour is where it exceeds 0.5 inside the ring)."""
    f = np.zeros_like(x)
    for c, sxy, sz, w in zip(t.centres, t.sigma_xy, t.sigma_z, t.weights, strict=True):
        f += w * np.exp(-0.5 * (((x - c[0]) ** 2 + (y - c[1]) ** 2) / sxy**2 + ((z - c[2]) / sz) ** 2))
    return f


def _floor_mask(mask: np.ndarray, score: np.ndarray, k: int = MIN_MASK_VOXELS) -> np.ndarray:
    if int(mask.sum()) >= k:
        return mask
    flat = score.ravel()
    thr = np.partition(flat, flat.size - k)[flat.size - k]
    return score >= thr


@dataclass
class RenderedGrid:
    """Clean (noise- and bias-free) tissue maps of some sequences on one grid, and the tumour mask."""

    grid: Grid
    clean: dict[str, np.ndarray]
    mask: np.ndarray
    body: np.ndarray = field(repr=False)


def render_timepoint(anat: Anatomy, fx: ImageEffects, timepoint: str, grid: Grid,
                     sequences: tuple[str, ...]) -> RenderedGrid:
    """Rasterise the scene of one timepoint on ``grid`` for ``sequences``.

    Returns clean tissue maps (t2w/dwi/ce_t1w on the 0-1 scale, adc in 1e-6 mm^2/s) and the
    reference tumour mask (blob field > 0.5 inside the tumour ring, at least
    :data:`MIN_MASK_VOXELS` voxels: tiny residuals are grown to the top-scoring voxels). Each
    structure is only evaluated in the index box that can hold it.
    """
    wx, wy, wz = grid.coords()
    off = anat.world_offset
    x = wx - np.float32(off[0])
    y = wy - np.float32(off[1])
    z = wz - np.float32(off[2])
    wlo, whi = grid.world_bounds()
    zlo, zhi = wlo[2] - off[2] - 1.0, whi[2] - off[2] + 1.0
    T = anat.tissue
    imgs = {s: np.zeros_like(x) for s in sequences}
    body = np.zeros_like(x)
    post = timepoint == "post"

    def box(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> tuple[slice, ...] | None:
        return grid.box(np.asarray(lo) + off, np.asarray(hi) + off)

    def paint(sl: tuple[slice, ...], alpha: np.ndarray, values: Mapping[str, float | np.ndarray]) -> None:
        for s in sequences:
            img = imgs[s][sl]
            img += alpha * (values[s] - img)

    fat_tex = 1.0 + 0.04 * _rff_field(anat.fat_k, anat.fat_phase, x, y, z)
    fat_vals = {s: T["fat"][s] * fat_tex for s in sequences}
    e = EDGE_MM

    def ellipse(name: str, cx: float, cy: float, a: float, b: float, *, is_body: bool = False) -> None:
        sl = box((cx - a - e, cy - b - e, zlo), (cx + a + e, cy + b + e, zhi))
        if sl is None:
            return
        al = _ellipse_alpha(x[sl], y[sl], cx, cy, a, b)
        if is_body:
            body[sl] = al
        vals = {s: v[sl] for s, v in fat_vals.items()} if name == "fat" else T[name]
        paint(sl, al, vals)

    for i, (name, (cx, cy, a, b)) in enumerate(anat.ellipses):
        ellipse(name, cx, cy, a, b, is_body=i == 0)
    mcx, mcy, ma, mb = anat.meso
    ellipse("fascia", mcx, mcy, ma * 1.05, mb * 1.06)
    ellipse("fat", mcx, mcy, ma, mb)
    for vx, vy, vr in anat.vessels:
        ellipse("vessel", vx, vy, vr, vr)
    for (px, py, pz), rad, mal in zip(anat.nodes_xyz, anat.nodes_radius, anat.nodes_malignant, strict=True):
        rad = rad * (fx.node_shrink if (post and mal) else 1.0)
        m = rad * 1.2 + e
        sl = box((px - m, py - m, pz - m), (px + m, py + m, pz + m))
        if sl is None:
            continue
        d = np.sqrt((x[sl] - px) ** 2 + (y[sl] - py) ** 2 + ((z[sl] - pz) / 1.2) ** 2)
        paint(sl, _clip01(0.5 - (d - rad) / e), T["node"])

    # rectum (a tube along z drifting with z) and tumour, in the box around it
    dxz = np.float32(anat.rect_drift[0] / anat.Hz)
    dyz = np.float32(anat.rect_drift[1] / anat.Hz)
    tum = anat.tumour
    zmax = max(abs(zlo), abs(zhi)) / anat.Hz
    rx = max(tum.rho_max, anat.r_outer) + e + 1.0 + abs(anat.rect_drift[0]) * zmax
    ry = max(tum.rho_max, anat.r_outer) + e + 1.0 + abs(anat.rect_drift[1]) * zmax
    sl = box((-rx, -ry, zlo), (rx, ry, zhi))
    mask = np.zeros(x.shape, dtype=bool)
    if sl is not None:
        xs, ys, zs = x[sl], y[sl], z[sl]
        rho = np.sqrt((xs - dxz * zs) ** 2 + (ys - dyz * zs) ** 2)
        paint(sl, _clip01(0.5 - (rho - anat.r_outer) / e), T["wall"])
        paint(sl, _clip01(0.5 - (rho - anat.r_lumen) / e), T[anat.lumen])
        ring = _clip01(0.5 + (rho - tum.rho_min) / e) * _clip01(0.5 + (tum.rho_max - rho) / e)
        if post:
            pre_f = tumour_field(tum, xs, ys, zs)
            bed = _clip01(0.5 + (pre_f - TUMOUR_THRESHOLD) / 0.3) * ring
            beta = 0.35 + 0.5 * fx.fibrosis
            paint(sl, bed, {s: (1 - beta) * T["wall"][s] + beta * T["fibrosis"][s] for s in sequences})
            tum = tum.shrunk(fx.volume_fraction ** (1.0 / 3.0), min_sigma=0.02 * anat.H)
        f = tumour_field(tum, xs, ys, zs)
        m_sub = (f > TUMOUR_THRESHOLD) & (ring >= 0.5)
        m_sub = _floor_mask(m_sub, f * ring)
        mask[sl] = m_sub
        alpha = np.maximum(_clip01(0.5 + (f - TUMOUR_THRESHOLD) / 0.3) * ring, m_sub.astype(np.float32))
        tex = _rff_field(anat.texture_k, anat.texture_phase, xs, ys, zs)
        tv: dict[str, float | np.ndarray] = {}
        for s in sequences:
            base = T["tumour"][s]
            fib = T["fibrosis"][s]
            if not post:
                if s == "dwi":
                    tv[s] = base * fx.pre_dwi_gain * (1.0 + fx.dwi_texture * tex)
                elif s == "adc":
                    tv[s] = base * fx.pre_adc_gain * (1.0 - 0.5 * fx.dwi_texture * tex)
                else:
                    tv[s] = base * (1.0 + fx.texture * tex)
            else:
                if s in ("dwi", "adc"):
                    mix = fx.dwi_loss
                    h = fx.dwi_texture * (1.0 - 0.5 * mix) * (1.0 if s == "dwi" else -0.5)
                else:
                    mix = fx.fibrosis * (1.0 if s == "t2w" else 0.7)
                    h = fx.texture * (1.0 - 0.5 * mix)
                tv[s] = ((1.0 - mix) * base + mix * fib) * (1.0 + h * tex)
        paint(sl, alpha, tv)
    if int(mask.sum()) < MIN_MASK_VOXELS:  # the tumour box missed the grid (cannot happen at sane shapes)
        raise RuntimeError(f"tumour outside the field of view of grid {grid.size}")
    return RenderedGrid(grid=grid, clean=imgs, mask=mask, body=body)


def acquire(clean: np.ndarray, sequence: str, profile: ScannerProfile, bias: np.ndarray | None,
            rng: np.random.Generator, body: np.ndarray) -> np.ndarray:
    """The scanner's view of a clean map: contrast, scale, bias, blur (DWI/ADC), noise -> int16.

    See the module docstring for the formula. ``bias`` (the multiplicative field B) is ignored for ADC.
    """
    epi = sequence in ("dwi", "adc")
    if sequence == "adc":
        a = clean * np.float32(profile.adc_gain)
        a = ndimage.gaussian_filter(a, sigma=(0.0, 0.6, 0.6))
        a = a + rng.standard_normal(size=a.shape, dtype=np.float32) * np.float32(profile.adc_noise) * (body > 0.5)
        return np.clip(np.rint(a), 0, 4000).astype(np.int16)
    scale = float(profile.scale[sequence])
    gamma = float(profile.gamma[sequence])
    s = np.maximum(clean, np.float32(0.0))
    if gamma != 1.0:
        s = np.power(s, np.float32(gamma))
    s *= np.float32(scale)
    s += np.float32(profile.offset)
    if bias is not None:
        s *= bias
    if epi:
        s = ndimage.gaussian_filter(s, sigma=(0.0, 0.6, 0.6))
    sigma = profile.noise * scale * (profile.dwi_noise_factor if epi else 1.0)
    sig32 = np.float32(sigma)
    n1 = rng.standard_normal(size=s.shape, dtype=np.float32) * sig32
    n2 = rng.standard_normal(size=s.shape, dtype=np.float32) * sig32
    mag = np.sqrt((s + n1) ** 2 + n2**2)
    return np.clip(np.rint(mag), 0, INT16_MAX).astype(np.int16)
