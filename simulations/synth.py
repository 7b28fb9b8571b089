"""The built-in synthetic multi-centre cohort (default data of the demo, the tests and the benchmarks).

:func:`generate_cohort` writes one folder per :class:`shared.config.SiteSpec`, in the site data
contract::

    <out_dir>/cohort.json                                   written last (atomically): the completeness mark
    <out_dir>/<site>/patients.csv                           one row per patient (columns CSV_COLUMNS)
    <out_dir>/<site>/images/<pid>/<pre|post>/<seq>.nii.gz   int16; or a DICOM series folder <seq>/
    <out_dir>/<site>/masks/<pid>/<pre|post>/<seq>.nii.gz    uint8 0/1 tumour VOI on the image's grid
    <out_dir>/<site>/masks_rater2/<pid>/<pre|post>/<seq>.nii.gz   perturbed second-rater VOI

Sequences are ``t2w``, ``dwi``, ``ce_t1w`` (+ ``adc`` with ``include_adc``); timepoints ``pre`` and
``post``. Patient ids are ``<site>-<NNNN>`` (e.g. ``site_a-0001``), unique across sites.

How the cohort is built
-----------------------
* **Labels.** A latent responsiveness ``r ~ N(0, 1)`` per patient gives the TRG through per-site
  thresholds, so that ``P(TRG 0-1) = prevalence`` (``simulations.synth_clinical``).
* **Images.** The pelvis is defined once per patient in millimetres and rasterised on each
  sequence's grid (``simulations.synth_render``); ``r * signal`` shrinks the post-treatment tumour,
  turns it dark on T2W (fibrosis) and removes its restricted diffusion; pre-treatment images carry
  only a weak signal (texture/DWI heterogeneity, DWI/ADC level). ``signal = 0``: no information.
* **Sites** differ by prevalence and scanner profile (:data:`SCANNER_PROFILES`: grid, intensity
  scale/offset, contrast, bias field, Rician noise, ADC calibration).
* **Missing masks.** For each (patient, timepoint) with ``n`` mask sequences, the whole timepoint
  is mask-less with probability ``p ** n`` (``p = missing_mask_fraction``); otherwise each
  sequence's mask is dropped independently with probability ``b`` and, if that dropped all of
  them, the first of t2w, ce_t1w, dwi, adc is kept. ``b`` solves
  ``p ** n + (1 - p ** n) * (b - b ** n / n) = p`` so the expected missing fraction is ``p``.
* **DICOM and second rater.** Exactly ``round(fraction * patients)`` patients per site (chosen by
  seed) have all their image volumes written as DICOM series, resp. second-rater masks for every
  reference mask they have (Dice vs reference drawn in 0.75-0.90).

Every random draw comes from a per-patient stream seeded from ``(seed, site name, index, purpose)``
with ``numpy.random.SeedSequence``; results do not depend on ``workers``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from shared.config import SiteSpec, SynthConfig
from simulations.synth_clinical import (
    CSV_COLUMNS,
    PatientLatent,
    patient_id,
    patient_record,
    patient_rng,
    sample_patients,
    trg_thresholds,
)
from simulations.synth_render import (
    MIN_MASK_VOXELS,
    SCANNER_PROFILES,
    BiasField,
    Grid,
    ImageEffects,
    ScannerProfile,
    acquire,
    image_effects,
    make_grids,
    reference_fov,
    render_timepoint,
    sample_anatomy,
    spacing_scale,
)

__all__ = [
    "CSV_COLUMNS",
    "GENERATOR_VERSION",
    "SCANNER_PROFILES",
    "CohortExistsError",
    "CohortSummary",
    "PatientVolumes",
    "ScannerProfile",
    "Volume",
    "cohort_sequences",
    "generate_cohort",
    "load_cohort_manifest",
    "missing_mask_plan",
    "read_dicom_series",
    "render_patient",
    "sample_patients",
    "second_rater_mask",
    "synth_volume",
    "trg_thresholds",
    "true_bias_field",
    "write_dicom_series",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0.0"
"""Bumped whenever the same parameters would give different data (an old cohort is then not reused)."""
TIMEPOINTS: tuple[str, ...] = ("pre", "post")
MASK_KEEP_ORDER: tuple[str, ...] = ("t2w", "ce_t1w", "dwi", "adc")
"""When the per-sequence draw drops every mask of a timepoint, the first of these present is kept."""
SECOND_RATER_DICE: tuple[float, float] = (0.75, 0.90)
MANIFEST = "cohort.json"
_PARTIAL = ".synth-incomplete.json"
_ALLOCATION_INDEX = 0xFFFFFFFF  # stream index of the per-site allocations (never a patient index)


class CohortExistsError(FileExistsError):
    """``out_dir`` holds something other than the requested cohort (pass ``overwrite=True``)."""


# --------------------------------------------------------------------------- rendering API


@dataclass
class Volume:
    """One rendered volume: int16 image (z, y, x), reference mask (bool), true bias field (float32)."""

    sequence: str
    timepoint: str
    grid: Grid
    image: np.ndarray
    mask: np.ndarray
    bias: np.ndarray

    def image_sitk(self) -> sitk.Image:
        return self.grid.image(self.image)

    def mask_sitk(self) -> sitk.Image:
        return self.grid.image(self.mask.astype(np.uint8))

    def bias_sitk(self) -> sitk.Image:
        return self.grid.image(self.bias.astype(np.float32))


@dataclass
class PatientVolumes:
    """Everything :func:`render_patient` knows about one patient (the hidden latent included)."""

    patient_id: str
    row: dict[str, Any]
    latent: PatientLatent
    effects: ImageEffects
    volumes: dict[tuple[str, str], Volume] = field(default_factory=dict)


def cohort_sequences(cfg: SynthConfig) -> tuple[str, ...]:
    """The sequences the cohort writes: t2w, dwi, ce_t1w (+ adc if ``cfg.include_adc``)."""
    return ("t2w", "dwi", "ce_t1w") + (("adc",) if cfg.include_adc else ())


def render_patient(cfg: SynthConfig, spec: SiteSpec, seed: int, index: int, *,
                   sequences: Iterable[str] | None = None, timepoints: Iterable[str] | None = None,
                   bias_strength: float | None = None) -> PatientVolumes:
    """Render patient ``index`` of site ``spec`` in memory (exactly what :func:`generate_cohort` writes).

    Parameters
    ----------
    cfg : SynthConfig
        Shape and signal (sites, fractions are not used here).
    spec : SiteSpec
        The patient's site (name, prevalence, scanner).
    seed : int
        Cohort seed.
    index : int
        0-based patient index within the site.
    sequences, timepoints : iterable of str, optional
        Restrict the rendering (default: :func:`cohort_sequences` and pre/post). A subset gives the
        same arrays as the full rendering.
    bias_strength : float, optional
        Override the scanner profile's bias strength (max |log B|); 0 gives no bias field.

    Returns
    -------
    PatientVolumes
        Clinical row, latent, image effects and the volumes keyed by ``(timepoint, sequence)``.
    """
    seqs = tuple(sequences) if sequences is not None else cohort_sequences(cfg)
    tps = tuple(timepoints) if timepoints is not None else TIMEPOINTS
    bad = [s for s in seqs if s not in ("t2w", "dwi", "ce_t1w", "adc")] + [t for t in tps if t not in TIMEPOINTS]
    if bad:
        raise ValueError(f"unknown sequence/timepoint {bad}: sequences are t2w, dwi, ce_t1w, adc; "
                         f"timepoints pre, post")
    profile = SCANNER_PROFILES[spec.scanner]
    latent, row = patient_record(seed, spec, index)
    pid = str(row["patient_id"])
    anat = sample_anatomy(patient_rng(seed, spec.name, index, "anatomy"), tuple(cfg.shape), row, latent,
                          cfg.fov_mm)
    fx = image_effects(latent, cfg.signal)
    out = PatientVolumes(patient_id=pid, row=row, latent=latent, effects=fx)
    strength = profile.bias_strength if bias_strength is None else float(bias_strength)
    for tp in tps:
        grng = patient_rng(seed, spec.name, index, f"geometry-{tp}")
        centre = anat.world_offset + np.array([grng.normal(0, 0.05 * anat.H), grng.normal(0, 0.05 * anat.H),
                                               grng.normal(0, 0.08 * anat.Hz)])
        t2_grid, dwi_grid = make_grids(tuple(cfg.shape), profile, centre, grng, cfg.fov_mm)
        bias = BiasField.sample(patient_rng(seed, spec.name, index, f"bias-{tp}"), t2_grid, strength)
        for grid, group in ((t2_grid, ("t2w", "ce_t1w")), (dwi_grid, ("dwi", "adc"))):
            wanted = tuple(s for s in group if s in seqs)
            if not wanted:
                continue
            rg = render_timepoint(anat, fx, tp, grid, wanted)
            b_field = np.exp(bias.log_field(grid)).astype(np.float32)
            for s in wanted:
                nrng = patient_rng(seed, spec.name, index, f"noise-{tp}-{s}")
                b = np.ones_like(b_field) if s == "adc" else b_field
                img = acquire(rg.clean[s], s, profile, None if s == "adc" else b_field, nrng, rg.body)
                out.volumes[(tp, s)] = Volume(s, tp, grid, img, rg.mask, b)
    return out


def synth_volume(sequence: str = "t2w", timepoint: str = "pre", *, scanner: str = "siemens_like",
                 shape: tuple[int, int, int] = (96, 96, 12), signal: float = 1.0, seed: int = 0,
                 index: int = 0, bias_strength: float | None = None, return_bias: bool = False,
                 return_mask: bool = False) -> sitk.Image | tuple[sitk.Image, ...]:
    """One synthetic volume as a SimpleITK image, optionally with its TRUE bias field and tumour mask.

    The image is ``B * clean + Rician noise`` where ``B`` (returned with ``return_bias``, float32 on
    the image's grid) is the smooth multiplicative bias field; ``max |log B| = bias_strength``
    (default: the scanner profile's) over the T2W/CE-T1W grid. ADC has no bias (B = 1).

    Returns
    -------
    sitk.Image or tuple
        ``image``, or ``(image, bias)``, ``(image, mask)`` or ``(image, bias, mask)``.

    Examples
    --------
    >>> img, bias = synth_volume("t2w", scanner="legacy_1p5t", seed=3, return_bias=True)  # doctest: +SKIP
    """
    spec = SiteSpec(name="synth", patients=4, scanner=scanner)  # type: ignore[arg-type]
    cfg = SynthConfig(sites=[spec], shape=shape, signal=signal)
    pv = render_patient(cfg, spec, seed, index, sequences=(sequence,), timepoints=(timepoint,),
                        bias_strength=bias_strength)
    vol = pv.volumes[(timepoint, sequence)]
    out: list[sitk.Image] = [vol.image_sitk()]
    if return_bias:
        out.append(vol.bias_sitk())
    if return_mask:
        out.append(vol.mask_sitk())
    return out[0] if len(out) == 1 else tuple(out)


def true_bias_field(cfg: SynthConfig, seed: int, site_name: str, pid: str, timepoint: str,
                    sequence: str) -> sitk.Image:
    """The TRUE bias field of a volume written by :func:`generate_cohort` (re-rendered from the seed).

    Parameters
    ----------
    cfg, seed : SynthConfig, int
        The cohort's parameters (``load_cohort_manifest(out_dir)["params"]`` holds them).
    site_name, pid, timepoint, sequence : str
        Which volume, e.g. ``("site_a", "site_a-0003", "pre", "t2w")``.

    Returns
    -------
    sitk.Image
        float32, on exactly the written image's grid.
    """
    spec = next((s for s in cfg.sites if s.name == site_name), None)
    if spec is None:
        raise KeyError(f"site {site_name!r} is not in the config (sites: {[s.name for s in cfg.sites]})")
    prefix = f"{site_name}-"
    if not pid.startswith(prefix) or not pid[len(prefix):].isdigit():
        raise ValueError(f"{pid!r} is not a patient id of site {site_name!r} (expected {prefix}NNNN)")
    index = int(pid[len(prefix):]) - 1
    pv = render_patient(cfg, spec, seed, index, sequences=(sequence,), timepoints=(timepoint,))
    return pv.volumes[(timepoint, sequence)].bias_sitk()


# --------------------------------------------------------------------------- masks


def missing_mask_plan(rng: np.random.Generator, sequences: Iterable[str], fraction: float) -> set[str]:
    """The sequences of one (patient, timepoint) that get NO reference mask (rule in the module docstring)."""
    seqs = list(sequences)
    n = len(seqs)
    p = float(fraction)
    u_whole = rng.random()
    u_each = rng.random(n)
    if n == 0 or p <= 0.0:
        return set()
    if p >= 1.0:
        return set(seqs)
    whole = p**n
    if u_whole < whole:
        return set(seqs)
    b = _solve_per_sequence_rate(p, n)
    missing = {s for s, u in zip(seqs, u_each, strict=True) if u < b}
    if len(missing) == n:
        keep = next((s for s in MASK_KEEP_ORDER if s in missing), seqs[0])
        missing.discard(keep)
    return missing


def _solve_per_sequence_rate(p: float, n: int) -> float:
    whole = p**n
    if n == 1:
        return 0.0
    target = (p - whole) / (1.0 - whole)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mid - mid**n / n < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_CROSS = np.zeros((3, 3, 3), dtype=bool)
_CROSS[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def second_rater_mask(mask: np.ndarray, rng: np.random.Generator,
                      dice_range: tuple[float, float] = SECOND_RATER_DICE) -> np.ndarray:
    """A second rater's version of ``mask`` (z, y, x): in-plane 1-voxel growth/shrinkage at random boundary parts.

    A smooth random field decides where the rater draws wider (outer ring voxels where it is
    positive) or tighter (inner boundary voxels where it is negative); the number of changed voxels
    is chosen so that the Dice against ``mask`` is as close as possible to a target drawn uniformly
    in ``dice_range`` (small masks may land a little off it). At least 10 voxels are kept.
    """
    target = float(rng.uniform(*dice_range))
    field_seed = int(rng.integers(0, 2**31 - 1))
    a = mask.astype(bool)
    if not a.any():
        return a.copy()
    idx = np.argwhere(a)
    lo = np.maximum(idx.min(0) - np.array([1, 4, 4]), 0)
    hi = np.minimum(idx.max(0) + np.array([2, 5, 5]), a.shape)
    sl = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi, strict=True))
    A = a[sl]
    frng = np.random.default_rng(field_seed)
    fld = ndimage.gaussian_filter(frng.standard_normal(A.shape), sigma=(0.7, 1.5, 1.5))
    fld /= max(float(fld.std()), 1e-9)
    n_a = int(A.sum())
    floor = min(MIN_MASK_VOXELS, n_a)
    B = _move_boundary(A, A.copy(), fld, target, floor)
    if _dice(A, B) > target + 0.05:  # too few voxels where the field pointed: use the other parts too
        B = _move_boundary(A, B, -fld, target, floor)
    out = np.zeros_like(a)
    out[sl] = B
    return out


def _move_boundary(A: np.ndarray, B: np.ndarray, fld: np.ndarray, target: float, floor: int) -> np.ndarray:
    """Grow ``B`` where ``fld > 0`` and shrink it where ``fld < 0``, strongest first, towards Dice(A, B) = target."""
    n_a = int(A.sum())
    for _ in range(4):
        outer = ndimage.binary_dilation(B, _CROSS) & ~B
        inner = B & ~ndimage.binary_erosion(B, _CROSS)
        add = np.flatnonzero((outer & (fld > 0)).ravel())
        rem = np.flatnonzero((inner & (fld < 0)).ravel())
        cand = np.concatenate([add, rem])
        if cand.size == 0:
            break
        sign = np.concatenate([np.ones(add.size, dtype=np.int64), -np.ones(rem.size, dtype=np.int64)])
        order = np.argsort(-np.abs(fld.ravel()[cand]), kind="stable")
        cand, sign = cand[order], sign[order]
        in_a = A.ravel()[cand].astype(np.int64)
        inter = int((A & B).sum()) + np.concatenate([[0], np.cumsum(sign * in_a)])
        n_b = int(B.sum()) + np.concatenate([[0], np.cumsum(sign)])
        dice = 2.0 * inter / (n_a + n_b)
        err = np.abs(dice - target)
        err[n_b < floor] = np.inf
        m = int(np.argmin(err))
        flat = B.ravel().copy()
        flat[cand[:m][sign[:m] > 0]] = True
        flat[cand[:m][sign[:m] < 0]] = False
        B = flat.reshape(A.shape)
        if dice[m] <= target + 0.02 or m == 0:
            break
    return B


# --------------------------------------------------------------------------- DICOM


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _ds(v: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    for digits in (10, 9, 8, 7, 6):
        s = f"{v:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{v:.5g}"


def write_dicom_series(image: sitk.Image, folder: Path, *, patient_id: str, study_uid: str,
                       series_uid: str, description: str, series_number: int = 1,
                       manufacturer: str = "rectalfl synthetic", field_strength_t: float | None = None
                       ) -> list[Path]:
    """Write a 3D int16 image as an MR DICOM series, one file per slice (``0001.dcm``...).

    Tags: modality MR (MR Image Storage), patient/study/series/SOP instance UIDs (the SOP UID is
    ``<series>.<n>``), frame of reference UID (= study UID + ``.1``), ImagePositionPatient per slice,
    ImageOrientationPatient, SliceThickness, InstanceNumber, series description/number,
    manufacturer, field strength; PixelSpacing and SpacingBetweenSlices come from the spacing. ``sitk.ImageSeriesReader`` with ``GetGDCMSeriesFileNames`` reads
    back the same grid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if image.GetPixelID() != sitk.sitkInt16:
        image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    sx, sy, sz = image.GetSpacing()
    common = {
        "0008|0008": "ORIGINAL\\PRIMARY\\M\\ND",
        "0008|0020": "20240101", "0008|0030": "090000",
        "0008|0021": "20240101", "0008|0031": "090000",
        "0008|0060": "MR",
        "0008|0070": manufacturer,
        "0008|103e": description,
        "0010|0010": patient_id, "0010|0020": patient_id,
        "0018|0050": _ds(sz),
        "0020|000d": study_uid, "0020|000e": series_uid,
        "0020|0011": str(series_number),
        "0020|0052": study_uid + ".1",
        "0020|0037": "\\".join(_ds(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
    }
    if field_strength_t is not None:
        common["0018|0087"] = _ds(field_strength_t)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k : k + 1]  # a one-slice 3D image, so GDCM writes SpacingBetweenSlices = sz
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(_ds(v) for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        p = folder / f"{k + 1:04d}.dcm"
        writer.SetFileName(str(p))
        writer.Execute(sl)
        paths.append(p)
    return paths


def read_dicom_series(folder: Path) -> sitk.Image:
    """Read a DICOM series folder with ``sitk.ImageSeriesReader`` (the way a site's loader does)."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise FileNotFoundError(f"no DICOM series in {folder}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute()


# --------------------------------------------------------------------------- cohort


@dataclass
class CohortSummary:
    """What :func:`generate_cohort` made (or found).

    Attributes
    ----------
    out_dir : Path
    sites : list of dict
        Per site: ``name``, ``external``, ``patients``, ``prevalence`` (realised fraction of good
        responders), ``target_prevalence``, ``scanner``.
    seconds : float
        Time taken by this call.
    reused : bool
        True when an identical complete cohort was already there.
    files, bytes : int
        Files and bytes of the cohort.
    """

    out_dir: Path
    sites: list[dict[str, Any]]
    seconds: float
    reused: bool = False
    files: int = 0
    bytes: int = 0

    @property
    def site_names(self) -> list[str]:
        return [s["name"] for s in self.sites]

    @property
    def external(self) -> dict[str, bool]:
        return {s["name"]: bool(s["external"]) for s in self.sites}

    @property
    def patients(self) -> dict[str, int]:
        return {s["name"]: int(s["patients"]) for s in self.sites}

    @property
    def prevalences(self) -> dict[str, float]:
        return {s["name"]: float(s["prevalence"]) for s in self.sites}


def _params(cfg: SynthConfig, seed: int) -> dict[str, Any]:
    synth = cfg.model_dump(mode="json")
    if synth.get("fov_mm") is None:  # the default: cohorts made before the option existed stay the same cohort
        synth.pop("fov_mm", None)
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "synth": synth}


def load_cohort_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Read ``<out_dir>/cohort.json``.

    Raises
    ------
    FileNotFoundError
        When there is no complete cohort in ``out_dir`` (naming the folder and how to make one).
    """
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        hint = " (an interrupted generation was found there)" if (Path(out_dir) / _PARTIAL).exists() else ""
        raise FileNotFoundError(
            f"no synthetic cohort in {Path(out_dir)}: {MANIFEST} is missing{hint}; "
            f"generate one with `rectalfl synth --out {out_dir}` or simulations.synth.generate_cohort")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {json.dumps(a)[:60]} there vs {json.dumps(b)[:60]} requested")
    return diffs


def _site_allocation(seed: int, spec: SiteSpec, what: str, fraction: float) -> set[int]:
    n = round(float(fraction) * spec.patients + 1e-9)
    if n <= 0:
        return set()
    rng = patient_rng(seed, spec.name, _ALLOCATION_INDEX, what)
    return {int(i) for i in rng.permutation(spec.patients)[:n]}


@dataclass(frozen=True)
class _Job:
    cfg: dict[str, Any]
    spec: dict[str, Any]
    seed: int
    index: int
    site_dir: str
    dicom: bool
    rater2: bool


def _write_nifti(img: sitk.Image, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path.stat().st_size


def _make_patient(job: _Job) -> tuple[int, dict[str, Any], int, int]:
    """Render and write one patient; returns (index, csv row, files, bytes)."""
    cfg = SynthConfig.model_validate(job.cfg)
    spec = SiteSpec.model_validate(job.spec)
    pv = render_patient(cfg, spec, job.seed, job.index)
    site = Path(job.site_dir)
    pid = pv.patient_id
    seqs = cohort_sequences(cfg)
    profile = SCANNER_PROFILES[spec.scanner]
    files = nbytes = 0
    for tp in TIMEPOINTS:
        missing = missing_mask_plan(patient_rng(job.seed, spec.name, job.index, f"masks-{tp}"), seqs,
                                    cfg.missing_mask_fraction)
        for si, s in enumerate(seqs):
            vol = pv.volumes[(tp, s)]
            img = vol.image_sitk()
            if job.dicom:
                folder = site / "images" / pid / tp / s
                paths = write_dicom_series(
                    img, folder, patient_id=pid, study_uid=_uid(job.seed, spec.name, pid, tp),
                    series_uid=_uid(job.seed, spec.name, pid, tp, s), description=f"{tp} {s}",
                    series_number=si + 1, manufacturer=f"rectalfl synthetic {spec.scanner}",
                    field_strength_t=profile.field_strength_t)
                files += len(paths)
                nbytes += sum(p.stat().st_size for p in paths)
            else:
                nbytes += _write_nifti(img, site / "images" / pid / tp / f"{s}.nii.gz")
                files += 1
            if s in missing:
                continue
            assert int(vol.mask.sum()) >= MIN_MASK_VOXELS
            nbytes += _write_nifti(vol.mask_sitk(), site / "masks" / pid / tp / f"{s}.nii.gz")
            files += 1
            if job.rater2:
                r2 = second_rater_mask(vol.mask, patient_rng(job.seed, spec.name, job.index, f"rater2-{tp}-{s}"))
                m2 = vol.grid.image(r2.astype(np.uint8))
                nbytes += _write_nifti(m2, site / "masks_rater2" / pid / tp / f"{s}.nii.gz")
                files += 1
    return job.index, pv.row, files, nbytes


def _worker_init() -> None:
    from shared.interrupt import ignore_in_worker

    ignore_in_worker()  # Ctrl-C is the parent's: it stops the pool and says how to continue
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _prepare_out_dir(out_dir: Path, cfg: SynthConfig, params: dict[str, Any], overwrite: bool) -> dict | None:
    """Decide what to do with ``out_dir``; returns the manifest when an identical cohort is there."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    manifest_path = out_dir / MANIFEST
    partial_path = out_dir / _PARTIAL
    ours: set[str] = set()
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        old = manifest.get("params", {})
        ours |= {s.get("name") for s in manifest.get("sites", []) if isinstance(s, dict)}
        if old == params:
            complete = all((out_dir / s.name / "patients.csv").is_file() for s in cfg.sites)
            if complete:
                return manifest
            logger.warning("%s: the cohort's site folders are incomplete; generating it again", out_dir)
        elif not overwrite:
            diffs = _describe_difference(old, params) or ["(unreadable cohort.json)"]
            raise CohortExistsError(
                f"{out_dir} holds a synthetic cohort made with different parameters: "
                + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
                + ". Pass overwrite=True (`rectalfl synth --overwrite`) to replace it, or use another folder.")
    elif partial_path.is_file():
        logger.warning("%s: an interrupted generation was found; generating the cohort again", out_dir)
        try:
            ours |= set(json.loads(partial_path.read_text()).get("sites", []))
        except json.JSONDecodeError:
            pass
    elif any(out_dir.iterdir()) and not overwrite:
        raise CohortExistsError(
            f"{out_dir} is not empty and holds no synthetic cohort ({MANIFEST} is missing). Pass "
            f"overwrite=True (`rectalfl synth --overwrite`) to write the cohort there anyway (site folders "
            f"named like the configured sites are replaced; other files are left alone), or use another folder.")
    # Remove only what a cohort writes: the manifest, the marker and the site folders (old and new).
    ours |= {s.name for s in cfg.sites}
    for name in sorted(n for n in ours if n):
        p = out_dir / name
        if p.is_dir() and p.resolve().parent == out_dir.resolve():
            shutil.rmtree(p)
    for p in (manifest_path, partial_path):
        p.unlink(missing_ok=True)
    return None


def _summary_from_manifest(out_dir: Path, manifest: dict[str, Any], seconds: float, reused: bool) -> CohortSummary:
    sites = [{k: s.get(k) for k in ("name", "external", "patients", "prevalence", "target_prevalence", "scanner")}
             for s in manifest["sites"]]
    return CohortSummary(out_dir=out_dir, sites=sites, seconds=seconds, reused=reused,
                         files=int(manifest.get("files", 0)), bytes=int(manifest.get("bytes", 0)))


def generate_cohort(cfg: SynthConfig, out_dir: str | Path, seed: int = 42, *, workers: int = 1,
                    progress: Callable[[int, int, str], None] | None = None,
                    overwrite: bool = False) -> CohortSummary:
    """Generate the synthetic multi-centre cohort in ``out_dir`` (the site data contract; see module docstring).

    Parameters
    ----------
    cfg : SynthConfig
        Sites, volume shape, response signal, fractions of missing masks, second-rater masks and
        DICOM cases, and ``include_adc``.
    out_dir : str or Path
        Target folder (created). One sub-folder per site plus ``cohort.json``.
    seed : int
        Cohort seed; every patient is seeded from ``(seed, site name, index)``.
    workers : int
        Processes rendering patients in parallel (a ``spawn`` pool, so a calling script needs the
        usual ``if __name__ == "__main__":`` guard); results do not depend on it.
    progress : callable, optional
        ``progress(done, total, label)``, called after each patient (label = patient id).
    overwrite : bool
        Replace a different cohort (or write into a non-empty folder without one). Only the
        manifest and the site folders (old and new names) are removed; an identical complete
        cohort is reused even with ``overwrite``.

    Returns
    -------
    CohortSummary

    Raises
    ------
    CohortExistsError
        ``out_dir`` holds a cohort with other parameters, or unrelated files, and ``overwrite`` is false.

    Notes
    -----
    A complete cohort with the same parameters (``cohort.json`` ``params``: seed, generator
    version and the whole ``SynthConfig``) is reused at once. ``cohort.json`` is written last and
    atomically; until then ``.synth-incomplete.json`` marks the folder, so an interrupted
    generation is detected and done again.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    params = _params(cfg, seed)
    total = sum(s.patients for s in cfg.sites)
    existing = _prepare_out_dir(out_dir, cfg, params, overwrite)
    if existing is not None:
        logger.info("reusing the synthetic cohort in %s (same parameters)", out_dir)
        if progress is not None:
            progress(total, total, "cohort reused")
        return _summary_from_manifest(out_dir, existing, time.perf_counter() - t0, reused=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _PARTIAL).write_text(json.dumps({"params": params, "sites": [s.name for s in cfg.sites]}))
    cfg_dump = cfg.model_dump(mode="json")
    jobs: list[_Job] = []
    for spec in cfg.sites:
        site_dir = out_dir / spec.name
        site_dir.mkdir(parents=True, exist_ok=True)
        dicom = _site_allocation(seed, spec, "dicom", cfg.dicom_fraction)
        rater2 = _site_allocation(seed, spec, "rater2", cfg.second_rater_fraction)
        for i in range(spec.patients):
            jobs.append(_Job(cfg_dump, spec.model_dump(mode="json"), int(seed), i, str(site_dir),
                             i in dicom, i in rater2))
    logger.info("generating %d synthetic patients at %d sites in %s (workers=%d)", total, len(cfg.sites),
                out_dir, workers)

    results: dict[tuple[str, int], tuple[dict[str, Any], int, int]] = {}
    done = 0

    def _record(job: _Job, res: tuple[int, dict[str, Any], int, int]) -> None:
        nonlocal done
        _, row, nf, nb = res
        results[(job.spec["name"], job.index)] = (row, nf, nb)
        done += 1
        if progress is not None:
            progress(done, total, str(row["patient_id"]))

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _record(job, _make_patient(job))
    else:
        from shared.interrupt import sigint_held_from_children

        ctx = multiprocessing.get_context("spawn")
        with sigint_held_from_children():  # a Ctrl-C is the parent's, even while a worker starts
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                       initializer=_worker_init)
            futures: dict[Future, _Job] = {pool.submit(_make_patient, job): job for job in jobs}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    exc = fut.exception()
                    if exc is not None:
                        raise exc
                    _record(futures[fut], fut.result())
        except BrokenProcessPool as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError(
                "the synthetic-cohort worker processes died (killed, out of memory, or they could not start: "
                "with workers > 1 the calling script is re-imported by each worker, so it must be a file whose "
                "top level is guarded by `if __name__ == \"__main__\":`); run with workers=1 to see the "
                "error in-process") from exc
        except BaseException:  # an error or Ctrl-C: drop the queued patients, let the ones in flight finish
            pool.shutdown(wait=True, cancel_futures=True)  # (workers ignore SIGINT; none outlives the command)
            raise
        pool.shutdown(wait=True)

    files = nbytes = 0
    site_entries = []
    for spec in cfg.sites:
        rows = [results[(spec.name, i)][0] for i in range(spec.patients)]
        files += sum(results[(spec.name, i)][1] for i in range(spec.patients))
        nbytes += sum(results[(spec.name, i)][2] for i in range(spec.patients))
        df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
        csv_path = out_dir / spec.name / "patients.csv"
        df.to_csv(csv_path, index=False)
        files += 1
        nbytes += csv_path.stat().st_size
        profile = SCANNER_PROFILES[spec.scanner]
        scale = spacing_scale(tuple(cfg.shape), cfg.fov_mm)
        t2 = [float(v) for v in np.array([profile.inplane_mm, profile.inplane_mm, profile.slice_mm]) * scale]
        nx, ny, _ = cfg.shape
        site_entries.append({
            "name": spec.name, "external": spec.external, "patients": spec.patients,
            "prevalence": round(float(df["response"].mean()), 6), "target_prevalence": spec.prevalence,
            "scanner": spec.scanner, "n_good": int(df["response"].sum()),
            "t2w_spacing_mm": t2,
            "dwi_spacing_mm": [nx * t2[0] / max(nx // 2, 4), ny * t2[1] / max(ny // 2, 4), t2[2]],
            "dicom_patients": sorted(patient_id(spec.name, i) for i in _site_allocation(
                seed, spec, "dicom", cfg.dicom_fraction)),
        })
    seconds = time.perf_counter() - t0
    manifest = {
        "generator": "simulations.synth", "generator_version": GENERATOR_VERSION,
        "seed": int(seed), "shape": list(cfg.shape), "fov_mm": [float(v) for v in reference_fov(tuple(cfg.shape), cfg.fov_mm)],
        "signal": cfg.signal,
        "sequences": list(cohort_sequences(cfg)), "timepoints": list(TIMEPOINTS),
        "missing_mask_fraction": cfg.missing_mask_fraction, "second_rater_fraction": cfg.second_rater_fraction,
        "dicom_fraction": cfg.dicom_fraction, "include_adc": cfg.include_adc,
        "sites": site_entries,
        "scanner_profiles": {name: SCANNER_PROFILES[name].as_dict() for name in sorted({s.scanner for s in cfg.sites})},
        "files": files, "bytes": nbytes, "seconds": round(seconds, 3),
        "params": params,
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / MANIFEST)
    (out_dir / _PARTIAL).unlink(missing_ok=True)
    logger.info("synthetic cohort: %d patients, %d files, %.1f MB in %.1f s -> %s", total, files, nbytes / 1e6,
                seconds, out_dir)
    return _summary_from_manifest(out_dir, manifest, seconds, reused=False)

