"""The site data contract: discover, validate and load a site's data; the integrity check every site runs.

A site folder holds::

    <site-dir>/
      patients.csv                     one row per patient: patient_id, trg (0-3) and/or response (0/1;
                                       1 = good = TRG 0-1), optional clinical-radiological columns
      images/<patient_id>/<pre|post>/<t2w|dwi|ce_t1w|adc>.<nii.gz|nii|nrrd|mha>
                                       or a DICOM series folder images/<pid>/<tp>/<seq>/
      masks/<patient_id>/<pre|post>/<sequence>.<ext>      reference tumour VOI (optional per case)
      masks_rater2/...                                    optional second rater (same layout)

Which sequences and timepoints are required is configuration (``cfg.data.sequences``,
``cfg.data.timepoints``). Bad input never crashes :func:`check_site` and is never silently
dropped: each problem is an :class:`Issue` naming the patient, the file, the fault and a fix, and a
patient with an error is excluded by that recorded decision (:attr:`CheckReport.excluded_patients`).

Preprocessing imports :func:`read_image`, :func:`find_volume`, :func:`load_patients`,
:func:`iter_volumes` and :class:`CohortError` from here.

    >>> from shared.cohort import check_site
    >>> report = check_site("data/synthetic/site_a", cfg)       # doctest: +SKIP
    >>> report.ok, report.to_table().head()                     # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.cohort_io import (
    EXTENSIONS,
    KIND_DIRS,
    NONFINITE_FIX,
    SERIES_FIX,
    SeriesProblem,
    VolumeInfo,
    dicom_series_files,
    dicom_series_problems,
    find_volume,
    read_dicom_series,
    read_image,
    read_volume_info,
    scan_nifti,
    split_volume_name,
    volume_candidates,
    volume_stem,
)
from shared.cohort_patients import (
    CLINICAL_COLUMNS,
    KNOWN_COLUMNS,
    PATIENTS_FILE,
    PatientsTable,
    is_valid_patient_id,
    load_patients,
    read_patients_table,
)
from shared.cohort_types import (
    EXCLUSION_COLUMNS,
    CheckReport,
    CohortError,
    Exclusion,
    Issue,
    Severity,
    VolumeRecord,
)
from shared.config import SEQUENCES, TIMEPOINTS, RectalFLConfig

__all__ = [
    "CLINICAL_COLUMNS",
    "EXTENSIONS",
    "ISSUE_CODES",
    "KNOWN_COLUMNS",
    "EXCLUSION_COLUMNS",
    "CheckReport",
    "CohortError",
    "Exclusion",
    "Issue",
    "VolumeInfo",
    "VolumeRecord",
    "check_site",
    "decide_exclusions",
    "find_fallback_mask",
    "find_volume",
    "iter_volumes",
    "load_patients",
    "read_image",
    "read_volume_info",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

ISSUE_CODES: dict[str, tuple[str, str]] = {
    # patients.csv (file level)
    "csv_missing": ("error", "patients.csv does not exist"),
    "csv_unparseable": ("error", "patients.csv is not parseable CSV (ragged rows, wrong delimiter, Excel, encoding)"),
    "csv_empty": ("error", "patients.csv is empty or has no patient rows"),
    "csv_duplicate_column": ("error", "two columns have the same (normalised) name"),
    "csv_no_patient_id": ("error", "no patient_id column"),
    "csv_no_label": ("error", "no trg/response column (or no trg when data.label is trg)"),
    "csv_unknown_columns": ("warning", "columns outside the contract (listed in one warning)"),
    # patients.csv (rows and columns)
    "invalid_patient_id": ("error", "empty id, or not matching ^[A-Za-z0-9_.-]+$ (or starting with '.')"),
    "duplicate_patient_id": ("error", "the same patient_id on several rows"),
    "label_invalid": ("error", "trg not an integer 0-3 or response not 0/1 (out of range or non-numeric)"),
    "label_inconsistent": ("error", "response disagrees with trg (response 1 iff trg <= 1)"),
    "label_missing": ("error", "the patient's outcome is empty"),
    "clinical_missing": ("warning", "a clinical column has empty values (one warning per column, with a count)"),
    "clinical_invalid": ("warning", "a clinical column has values of the wrong type (treated as missing)"),
    "clinical_implausible": ("warning", "a clinical column has values outside the plausible range (kept)"),
    # folders
    "images_folder_missing": ("error", "the site has no images/ folder"),
    "no_images": ("error", "a patient in patients.csv has no images/<patient_id>/ folder"),
    "unknown_patient": ("warning", "a folder under images/, masks/ or masks_rater2/ has no row in patients.csv"),
    "unknown_timepoint": ("warning", "a folder that is not a contract timepoint (pre, post)"),
    "unknown_sequence": ("warning", "a file/folder that is not a contract sequence (t2w, dwi, ce_t1w, adc)"),
    "unknown_file": ("warning", "a file with an unaccepted extension, or a file where a folder belongs"),
    # volumes
    "missing_image": ("error", "a required timepoint x sequence image does not exist"),
    "ambiguous_file": ("error", "several candidates for one image or mask (e.g. t2w.nii.gz and t2w.nrrd)"),
    "unreadable_file": ("error", "missing/empty/truncated/corrupt file or DICOM folder without a series"),
    "not_3d": ("error", "the volume is not 3-D (2-D, 4-D)"),
    "not_scalar": ("error", "the volume has several components per voxel (RGB/vector)"),
    "multiple_series": ("warning", "a DICOM folder holds several series; the largest is used"),
    "single_slice": ("warning", "a 3-D volume with a single voxel along an axis"),
    "implausible_spacing": ("error", "voxel spacing outside [check.spacing_min_mm, check.spacing_max_mm]"),
    "nonfinite_voxels": ("error", "NaN or infinite voxel values"),
    "constant_image": ("error", "every voxel has the same value"),
    "dicom_missing_slices": ("error", "a DICOM series has a gap: one or more slices are missing"),
    "dicom_duplicate_slices": ("error", "a DICOM series holds the same slice position twice"),
    "dicom_empty_file": ("error", "a zero-byte file in a DICOM series folder (a slice that was not copied)"),
    "dicom_nonuniform_spacing": ("error", "the slices of a DICOM series are not evenly spaced"),
    # masks
    "geometry_mismatch": ("error", "mask grid differs from its image (size/spacing/origin/direction)"),
    "empty_mask": ("error", "the mask has no foreground voxel"),
    "non_binary_mask": ("error", "mask with several labels or fractional values"),
    "mask_label_value": ("warning", "mask with values {0, k}, k != 1: will be binarised"),
    "mask_too_small": ("warning", "fewer foreground voxels than check.min_mask_voxels"),
    "mask_full": ("warning", "every voxel of the mask is foreground"),
    "mask_from_other_sequence": ("warning", "no own mask; another sequence's mask at the timepoint overlaps "
                                            "and will be resampled in physical space"),
    "no_mask": ("error", "no usable mask for the volume (or data.require_masks); preprocessing marks it no_mask"),
    # anything else
    "unexpected_error": ("error", "an unexpected exception while checking a file or folder (text included)"),
}
# second rater: every mask problem of masks_rater2/ is reported as rater2_<code>, always a warning
ISSUE_CODES.update({
    f"rater2_{code}": ("warning", f"second-rater mask: {ISSUE_CODES[code][1]}")
    for code in ("ambiguous_file", "unreadable_file", "not_3d", "not_scalar", "multiple_series", "geometry_mismatch",
                 "nonfinite_voxels", "empty_mask", "non_binary_mask", "mask_label_value", "mask_too_small", "mask_full",
                 "dicom_missing_slices", "dicom_duplicate_slices", "dicom_empty_file", "dicom_nonuniform_spacing")
})
"""Every issue code :func:`check_site` emits: code -> (severity, meaning)."""

_EXPORT_FIX = ("re-export the volume (e.g. dcm2niix from the original DICOM, or save as .nii.gz from the viewer) "
               "or re-copy it, and check the copy completed")
_MASK_GRID_FIX = ("re-export the mask on its image's grid (same size, spacing, origin, direction), e.g. resample it "
                  "onto the image with nearest-neighbour interpolation in 3D Slicer/ITK-SNAP")


# --------------------------------------------------------------------------- probing one file


@dataclass
class _Probe:
    """What was learnt from opening one volume (a file or DICOM folder)."""

    path: Path
    info: VolumeInfo | None = None
    error: str | None = None
    error_code: str = "unreadable_file"
    n_series: int = 1
    pixels: bool = False
    nonfinite: int = 0
    vmin: float = float("nan")
    vmax: float = float("nan")
    values: list[float] = field(default_factory=list)
    fractional: bool = False
    fg_count: int = 0
    fg_lo: np.ndarray | None = None
    fg_hi: np.ndarray | None = None
    series: list[SeriesProblem] = field(default_factory=list)
    """A DICOM series folder's damage (gaps, duplicates, empty files, uneven spacing)."""

    @property
    def ok3d(self) -> bool:
        return self.info is not None and self.info.dimension == 3 and self.info.components == 1


def _strip_path(message: str, path: Path) -> str:
    """``"<path>: cannot read the image: <reason>"`` -> ``"<reason>"`` (the issue names the file)."""
    for prefix in (f"{path}: ", "cannot read the image header: ", "cannot read the image: "):
        message = message.removeprefix(prefix)
    return message


def _unique_values(arr: np.ndarray) -> np.ndarray:
    """Distinct values of an integer array, fast for the small ranges of label masks."""
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo < 1 << 16:
        counts = np.bincount(arr.ravel().astype(np.int64) - lo)
        return np.nonzero(counts)[0] + lo
    return np.unique(arr)


def _probe(path: Path, *, pixels: bool, mask: bool) -> _Probe:
    """Open ``path`` and gather header (and with ``pixels``, voxel) facts; never raises."""
    pr = _Probe(path)
    try:
        img: sitk.Image | None = None
        raw_nonfinite: int | None = None
        if path.is_dir():
            files, pr.n_series = dicom_series_files(path)
            pr.series = dicom_series_problems(path, files)
            img = read_dicom_series(path, files)
            pr.info = VolumeInfo.from_image(img)
        else:
            pr.info = read_volume_info(path)
            problem, raw_nonfinite = scan_nifti(path, full=pixels)
            if problem:
                raise CohortError(f"{path}: {problem}")
            if pixels and pr.ok3d:
                img = read_image(path, verify=False)
        if pixels and pr.ok3d and img is not None:
            _pixel_stats(pr, sitk.GetArrayViewFromImage(img), mask=mask)
            pr.pixels = True
            # ITK turns NaN/inf voxels of NIfTI files into 0 on reading: count them in the raw file
            pr.nonfinite = max(pr.nonfinite, raw_nonfinite or 0)
    except CohortError as exc:
        pr.error = _strip_path(str(exc), path)
    except Exception as exc:  # noqa: BLE001 - any failure on one file becomes an Issue
        logger.debug("unexpected error on %s", path, exc_info=True)
        pr.error, pr.error_code = f"{type(exc).__name__}: {exc}", "unexpected_error"
    return pr


def _pixel_stats(pr: _Probe, arr: np.ndarray, *, mask: bool) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        pr.nonfinite = int(arr.size - np.count_nonzero(finite))
        good = arr[finite] if pr.nonfinite else arr
    else:
        good = arr
    if good.size:
        pr.vmin, pr.vmax = float(good.min()), float(good.max())
    if not mask:
        return
    if not good.size:
        vals = np.array([])
    elif np.issubdtype(good.dtype, np.floating):
        pr.fractional = bool(np.any(good != np.floor(good)))
        vals = np.unique(good) if pr.fractional else _unique_values(good.astype(np.int64))
    elif good.dtype == np.bool_:
        vals = np.unique(good.astype(np.uint8))
    else:
        vals = _unique_values(good)
    pr.values = [float(v) for v in vals[:50]]
    fg = arr != 0
    if np.issubdtype(arr.dtype, np.floating):
        fg &= np.isfinite(arr)
    pr.fg_count = int(np.count_nonzero(fg))
    if pr.fg_count:
        zyx = [np.nonzero(np.any(fg, axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
        lo = np.array([z[0] for z in zyx])[::-1]
        hi = np.array([z[-1] for z in zyx])[::-1]
        pr.fg_lo, pr.fg_hi = lo, hi


def _fmt(v: tuple[float, ...] | np.ndarray, nd: int = 4) -> str:
    return "(" + ", ".join(f"{float(x):.{nd}g}" for x in v) + ")"


def _geometry_diffs(mask: VolumeInfo, image: VolumeInfo, tol: float) -> list[str]:
    """Human descriptions of how ``mask``'s grid differs from ``image``'s (empty when they match)."""
    out: list[str] = []
    if mask.size != image.size:
        out.append(f"size {mask.size} vs image {image.size}")
    sm, si = np.asarray(mask.spacing), np.asarray(image.spacing)
    ds = np.abs(sm - si)
    if np.any(ds > tol * np.maximum(np.abs(si), 1e-12)):
        out.append(f"spacing {_fmt(sm)} vs image {_fmt(si)} mm (differs by up to {ds.max():.4g} mm)")
    do = np.asarray(mask.origin) - np.asarray(image.origin)
    otol = tol * float(np.min(np.abs(si)))
    if np.any(np.abs(do) > otol):
        out.append(f"origin {_fmt(mask.origin)} vs image {_fmt(image.origin)} mm: shifted by {_fmt(do)} mm "
                   f"(largest {np.abs(do).max():.4g} mm; tolerance {otol:.2g} mm)")
    dd = np.abs(np.asarray(mask.direction) - np.asarray(image.direction))
    if np.any(dd > tol):
        out.append(f"direction {_fmt(mask.direction, 3)} vs image {_fmt(image.direction, 3)} "
                   f"(cosines differ by up to {dd.max():.3g}; tolerance {tol:g})")
    return out


def _overlaps(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.all(a[0] <= b[1]) and np.all(b[0] <= a[1]))


def _mask_region(pr: _Probe) -> tuple[np.ndarray, np.ndarray] | None:
    """Physical box of a mask's foreground (or its whole grid when pixels were not read)."""
    if not pr.ok3d or pr.info is None:
        return None
    if pr.pixels:
        if not pr.fg_count:
            return None
        return pr.info.physical_bounds(pr.fg_lo, pr.fg_hi)
    return pr.info.physical_bounds()


def _mask_usable(pr: _Probe) -> tuple[bool, str]:
    """Whether a mask can serve as a tumour VOI at all (for the fallback), and why not."""
    if pr.error:
        return False, f"cannot be read ({pr.error})"
    if not pr.ok3d:
        return False, "is not a 3-D scalar volume"
    if pr.pixels:
        nz = [v for v in pr.values if v != 0]
        if not pr.fg_count:
            return False, "is empty"
        if pr.fractional or len(nz) > 1:
            return False, "is not binary"
    return True, ""


# --------------------------------------------------------------------------- the checker


class _SiteChecker:
    """State of one :func:`check_site` run."""

    def __init__(self, site: Path, cfg: RectalFLConfig, read_pixels: bool, progress: Progress | None) -> None:
        self.site = site
        self.cfg = cfg
        self.read_pixels = read_pixels
        self.progress = progress
        self.issues: list[Issue] = []
        self.probes: dict[Path, _Probe] = {}
        self.reported: set[tuple[Path, str]] = set()

    # ---- helpers
    def rel(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            return path.relative_to(self.site).as_posix()
        except ValueError:
            return str(path)

    def add(self, severity: Severity, code: str, pid: str | None, path: Path | str | None, message: str,
            fix: str) -> None:
        rel = self.rel(path) if isinstance(path, Path) else path
        self.issues.append(Issue(severity, code, pid, rel, message, fix))

    def probe(self, path: Path, *, mask: bool) -> _Probe:
        if path not in self.probes:
            self.probes[path] = _probe(path, pixels=self.read_pixels, mask=mask)
        return self.probes[path]

    # ---- run
    def run(self) -> CheckReport:
        try:
            pt = read_patients_table(self.site, self.cfg)
        except Exception as exc:  # noqa: BLE001
            logger.debug("unexpected error reading patients.csv", exc_info=True)
            pt = PatientsTable(None)
            self.add("error", "unexpected_error", None, PATIENTS_FILE,
                     f"{PATIENTS_FILE}: unexpected error while reading: {type(exc).__name__}: {exc}",
                     "check the file by hand; report this error to the rectalfl maintainers")
        self.issues.extend(pt.issues)
        images = self.site / KIND_DIRS["image"]
        known = set(pt.listed_ids) if pt.table is not None else None
        if not images.is_dir():
            self.add("error", "images_folder_missing", None, "images",
                     f"the site has no images/ folder ({images})",
                     "put each patient's volumes under images/<patient_id>/<pre|post>/<sequence>.nii.gz")
        try:
            self.scan_tree(known)
        except Exception as exc:  # noqa: BLE001
            logger.debug("unexpected error scanning folders", exc_info=True)
            self.add("error", "unexpected_error", None, None,
                     f"unexpected error while listing the site folders: {type(exc).__name__}: {exc}",
                     "check folder permissions; report this error to the rectalfl maintainers")

        if pt.table is not None:
            patients = pt.valid_ids
        else:  # still check every volume, so one run shows all problems
            patients = sorted(p.name for p in self._subdirs(images) if is_valid_patient_id(p.name))
        todo: list[str] = []
        for pid in patients:
            if (images / pid).is_dir():
                todo.append(pid)
            elif pt.table is not None and images.is_dir():
                close = difflib.get_close_matches(pid, [p.name for p in self._subdirs(images)], n=1, cutoff=0.8)
                hint = f" (there is a folder images/{close[0]}: a misspelt id?)" if close else ""
                self.add("error", "no_images", pid, f"images/{pid}",
                         f"patient {pid}: listed in {PATIENTS_FILE} but has no folder images/{pid}/{hint}",
                         f"add images/{pid}/<pre|post>/<sequence>.nii.gz, or remove the patient from {PATIENTS_FILE}")
            elif pt.table is not None:
                self.add("error", "no_images", pid, f"images/{pid}",
                         f"patient {pid}: no folder images/{pid}/ (the site has no images/ folder)",
                         f"add images/{pid}/<pre|post>/<sequence>.nii.gz")

        tps, seqs = list(self.cfg.data.timepoints), list(self.cfg.data.sequences)
        total = len(todo) * len(tps) * len(seqs)
        done = 0
        if self.progress:
            self.progress(0, total, "")
        for pid in todo:
            for tp in tps:
                try:
                    self.check_timepoint(pid, tp, seqs)
                except Exception as exc:  # noqa: BLE001
                    logger.debug("unexpected error on %s %s", pid, tp, exc_info=True)
                    self.add("error", "unexpected_error", pid, f"images/{pid}/{tp}",
                             f"patient {pid}, images/{pid}/{tp}: unexpected error while checking: "
                             f"{type(exc).__name__}: {exc}",
                             "check these files by hand; report this error to the rectalfl maintainers")
                done += len(seqs)
                if self.progress:
                    self.progress(done, total, f"{pid} {tp}")

        n_patients = len(pt.listed_ids) + pt.n_empty_ids
        rule = self.cfg.check.exclusion
        exclusions = decide_exclusions(self.issues, rule)
        excluded = {e.patient_id for e in exclusions if e.scope == "patient"}
        usable = len([p for p in pt.listed_ids if p not in excluded]) if pt.table is not None else 0
        report = CheckReport(self.site, n_patients, usable, self.issues, len(self.probes), rule, exclusions)
        logger.info("%s: %d patients, %d usable, %d volumes checked, %d error(s), %d warning(s)",
                    self.site, n_patients, usable, report.volumes_checked, len(report.errors), len(report.warnings))
        return report

    # ---- folder layout
    @staticmethod
    def _subdirs(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))

    @staticmethod
    def _entries(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX")))

    def scan_tree(self, known: set[str] | None) -> None:
        """Report folders and files that do not fit the layout (unknown patients, timepoints, sequences)."""
        for kind, root_name in KIND_DIRS.items():
            root = self.site / root_name
            if not root.is_dir():
                continue
            for entry in self._entries(root):
                if not entry.is_dir():
                    self.add("warning", "unknown_file", None, entry,
                             f"{self.rel(entry)}: a file directly under {root_name}/, which holds one folder per "
                             "patient; ignored", f"move it out of {root_name}/")
                    continue
                pid = entry.name
                if known is not None and pid not in known:
                    close = difflib.get_close_matches(pid, sorted(known), n=1, cutoff=0.8)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    what = "its images are" if kind == "image" else "its masks are"
                    self.add("warning", "unknown_patient", pid, entry,
                             f"patient {pid}, {self.rel(entry)}/: no row in {PATIENTS_FILE}{hint}; {what} ignored",
                             f"add {pid} with its label to {PATIENTS_FILE}, or rename/remove the folder "
                             "(ids must match exactly, including case and leading zeros)")
                    continue
                self._scan_patient(entry, pid, root_name)

    def _scan_patient(self, folder: Path, pid: str, root_name: str) -> None:
        for tp_dir in self._entries(folder):
            if not tp_dir.is_dir():
                self.add("warning", "unknown_file", pid, tp_dir,
                         f"patient {pid}, {self.rel(tp_dir)}: a file where a timepoint folder (pre/post) belongs; "
                         "ignored", f"move it to {root_name}/{pid}/<pre|post>/")
                continue
            if tp_dir.name not in TIMEPOINTS:
                close = difflib.get_close_matches(tp_dir.name.lower(), TIMEPOINTS, n=1, cutoff=0.6)
                hint = f" (rename to {close[0]}?)" if close else ""
                self.add("warning", "unknown_timepoint", pid, tp_dir,
                         f"patient {pid}, {self.rel(tp_dir)}/: '{tp_dir.name}' is not a timepoint of the contract "
                         f"({', '.join(TIMEPOINTS)}){hint}; ignored",
                         "rename the folder to pre (before therapy) or post (after), or move it out")
                continue
            for item in self._entries(tp_dir):
                self._scan_item(item, pid, root_name)

    def _scan_item(self, item: Path, pid: str, root_name: str) -> None:
        seqs = ", ".join(SEQUENCES)
        if item.is_dir():
            name, ext = item.name, ""
        else:
            parts = split_volume_name(item.name)
            if parts is None:
                stem = item.name.split(".", 1)[0]
                self.add("warning", "unknown_file", pid, item,
                         f"patient {pid}, {self.rel(item)}: not a volume of the contract (extension must be one of "
                         f"{', '.join(EXTENSIONS)}, or a DICOM series folder <sequence>/); ignored",
                         f"convert it to {stem}.nii.gz (or put DICOM slices in a folder {stem}/), or move it out")
                return
            name, ext = parts
        if name in SEQUENCES:
            return
        close = [s for s in SEQUENCES if s == name.lower()] or difflib.get_close_matches(
            name.lower(), SEQUENCES, n=1, cutoff=0.6)
        hint = f" (rename to {close[0]}{ext}?)" if close else ""
        self.add("warning", "unknown_sequence", pid, item,
                 f"patient {pid}, {self.rel(item)}: '{name}' is not a sequence of the contract ({seqs}){hint}; "
                 "ignored", "rename it if it is one of those sequences (lower case), otherwise move it out")

    # ---- volumes
    def check_timepoint(self, pid: str, tp: str, seqs: list[str]) -> None:
        images: dict[str, _Probe] = {}
        own_mask: dict[str, bool] = {}
        for seq in seqs:
            img = self.check_image(pid, tp, seq)
            if img is None:
                continue
            images[seq] = img
            own_mask[seq] = self.check_mask(pid, tp, seq, img, "mask")
            self.check_mask(pid, tp, seq, img, "mask_rater2")
        for seq, img in images.items():
            if not own_mask[seq]:
                self.check_fallback(pid, tp, seq, img)

    def _ambiguous(self, pid: str, tp: str, seq: str, kind: str, cands: list[Path]) -> None:
        severity: Severity = "warning" if kind == "mask_rater2" else "error"
        code = "rater2_ambiguous_file" if kind == "mask_rater2" else "ambiguous_file"
        names = ", ".join(self.rel(c) + ("/" if c.is_dir() else "") for c in cands)
        self.add(severity, code, pid, cands[0],
                 f"patient {pid}, {self.rel(cands[0])}: {len(cands)} candidates for the {tp} {seq} "
                 f"{'image' if kind == 'image' else 'mask'}: {names}; {self.rel(cands[0])} would be used",
                 "keep exactly one file (or DICOM folder) per volume: delete or move the others")

    def check_image(self, pid: str, tp: str, seq: str) -> _Probe | None:
        cands = volume_candidates(self.site, pid, tp, seq, "image")
        stem = volume_stem(self.site, pid, tp, seq, "image")
        if not cands:
            rel = self.rel(stem)
            extra = (f" (the folder {rel}/ is empty)" if stem.is_dir()
                     else "" if stem.parent.is_dir() else f" (there is no folder {self.rel(stem.parent)}/)")
            self.add("error", "missing_image", pid, f"{rel}.nii.gz",
                     f"patient {pid}: no {tp} {seq} image: looked for {rel}.nii.gz, .nii, .nrrd, .mha or a DICOM "
                     f"folder {rel}/{extra}",
                     f"add {rel}.nii.gz; if the site has no {seq} at all, leave it out of data.sequences "
                     "in the site config")
            return None
        if len(cands) > 1:
            self._ambiguous(pid, tp, seq, "image", cands)
        path = cands[0]
        pr = self.probe(path, mask=False)
        if (path, "image") in self.reported:
            return pr
        self.reported.add((path, "image"))
        where = f"patient {pid}, {self.rel(path)}{'/' if path.is_dir() else ''}"
        self._common_issues(pr, pid, where, "image")
        if pr.error or not pr.ok3d or pr.info is None:
            return pr
        sp = np.asarray(pr.info.spacing)
        lo, hi = self.cfg.check.spacing_min_mm, self.cfg.check.spacing_max_mm
        if np.any(sp < lo) or np.any(sp > hi):
            self.add("error", "implausible_spacing", pid, path,
                     f"{where}: voxel spacing {_fmt(sp)} mm is outside [{lo:g}, {hi:g}] mm "
                     "(check.spacing_min_mm/spacing_max_mm)",
                     "check the header: such a spacing is usually a conversion error (re-convert from DICOM with "
                     "dcm2niix); if it is real, widen check.spacing_min_mm/spacing_max_mm in the site config")
        if min(pr.info.size) == 1:
            self.add("warning", "single_slice", pid, path,
                     f"{where}: size {pr.info.size} has a single voxel along an axis",
                     "export the whole volume (all slices), not one slice")
        if pr.pixels:
            if pr.nonfinite:
                self.add("error", "nonfinite_voxels", pid, path,
                         f"{where}: {pr.nonfinite} voxel(s) are NaN or infinite", NONFINITE_FIX)
            if not (pr.vmin < pr.vmax):
                value = "NaN" if pr.vmin != pr.vmin else f"{pr.vmin:g}"
                self.add("error", "constant_image", pid, path,
                         f"{where}: every voxel has the same value ({value}); the image holds no information",
                         _EXPORT_FIX)
        return pr

    def _common_issues(self, pr: _Probe, pid: str, where: str, kind: str) -> None:
        """Readability, dimension, components, DICOM series count (images and masks alike)."""
        rater2 = kind == "mask_rater2"
        sev: Severity = "warning" if rater2 else "error"
        pre = "rater2_" if rater2 else ""
        path = pr.path
        if pr.error:
            if pr.error_code == "unexpected_error":
                self.add("error", "unexpected_error", pid, path, f"{where}: unexpected error while reading: {pr.error}",
                         "check the file by hand; report this error to the rectalfl maintainers")
            else:
                self.add(sev, pre + pr.error_code, pid, path, f"{where}: cannot be read: {pr.error}", _EXPORT_FIX)
            return
        info = pr.info
        assert info is not None
        for problem in pr.series:
            self.add(sev, pre + problem.code, pid, path, f"{where}: damaged DICOM series: {problem.message}",
                     SERIES_FIX)
        if pr.n_series > 1:
            self.add("warning", pre + "multiple_series", pid, path,
                     f"{where}: the DICOM folder holds {pr.n_series} series; the one with most files is used",
                     "keep one series per folder")
        if info.dimension != 3:
            self.add(sev, pre + "not_3d", pid, path,
                     f"{where}: a {info.dimension}-D volume of size {info.size}; a 3-D volume is required",
                     "export the 3-D volume (for multi-b-value DWI, one 3-D file per volume, e.g. the highest b)"
                     if info.dimension > 3 else "export the whole 3-D volume, not a single slice")
        elif info.components != 1:
            self.add(sev, pre + "not_scalar", pid, path,
                     f"{where}: {info.components} components per voxel ({info.pixel_type}); a scalar (grey-level) "
                     "volume is required", "export the grey-level volume (not RGB/screenshot/vector)")

    def check_mask(self, pid: str, tp: str, seq: str, img: _Probe, kind: str) -> bool:
        """Check the own (or second-rater) mask of one volume; return whether it exists."""
        cands = volume_candidates(self.site, pid, tp, seq, kind)
        if not cands:
            return False
        if len(cands) > 1:
            self._ambiguous(pid, tp, seq, kind, cands)
        path = cands[0]
        rater2 = kind == "mask_rater2"
        sev: Severity = "warning" if rater2 else "error"
        pre = "rater2_" if rater2 else ""
        pr = self.probe(path, mask=True)
        if (path, kind) in self.reported:
            return True
        self.reported.add((path, kind))
        where = f"patient {pid}, {self.rel(path)}{'/' if path.is_dir() else ''}"
        self._common_issues(pr, pid, where, kind)
        if pr.error or not pr.ok3d or pr.info is None:
            return True
        if img.ok3d and img.info is not None and not img.error and not img.series:
            # (against a damaged series the image's own geometry is wrong: its rows say so, not the mask's)
            diffs = _geometry_diffs(pr.info, img.info, self.cfg.check.geometry_tolerance)
            if diffs:
                self.add(sev, pre + "geometry_mismatch", pid, path,
                         f"{where}: the mask's grid does not match its image {self.rel(img.path)}: "
                         + "; ".join(diffs),
                         _MASK_GRID_FIX + ("" if not rater2 else "; second-rater masks only feed the "
                                           "inter-rater analysis"))
        if not pr.pixels:
            return True
        if pr.nonfinite:
            self.add(sev, pre + "nonfinite_voxels", pid, path, f"{where}: {pr.nonfinite} mask voxel(s) are NaN or "
                     "infinite", "re-export the mask as an integer label image (0 = background, 1 = tumour)")
        nonzero = [v for v in pr.values if v != 0]
        min_vox = self.cfg.check.min_mask_voxels
        if not pr.fg_count:
            self.add(sev, pre + "empty_mask", pid, path,
                     f"{where}: the mask has no foreground voxel (all 0); the volume cannot yield a tumour slice",
                     "re-export the segmentation (was the right label saved?) or delete the empty file")
            return True
        if pr.fractional or len(nonzero) > 1:
            shown = ", ".join(f"{v:g}" for v in pr.values[:8]) + (", ..." if len(pr.values) > 8 else "")
            why = "fractional values (a probability map?)" if pr.fractional else "several labels"
            self.add(sev, pre + "non_binary_mask", pid, path,
                     f"{where}: the mask has {why}: values {{{shown}}}; a binary tumour mask (0/1) is required",
                     "export only the tumour label as a binary mask (threshold a probability map at 0.5)")
        elif nonzero and nonzero[0] != 1:
            self.add("warning", pre + "mask_label_value", pid, path,
                     f"{where}: the mask's values are {{0, {nonzero[0]:g}}} instead of {{0, 1}}; it will be "
                     "binarised (non-zero = tumour)", "nothing to do, or re-export it with label 1")
        if pr.info is not None and pr.fg_count == int(np.prod(pr.info.size)):
            self.add("warning", pre + "mask_full", pid, path,
                     f"{where}: every voxel of the mask is foreground; is the label inverted?",
                     "re-export the mask with 0 = background, 1 = tumour")
        elif pr.fg_count < min_vox:
            self.add("warning", pre + "mask_too_small", pid, path,
                     f"{where}: the mask has {pr.fg_count} foreground voxel(s), fewer than "
                     f"check.min_mask_voxels = {min_vox}", "check the segmentation covers the tumour")
        return True

    def check_fallback(self, pid: str, tp: str, seq: str, img: _Probe) -> None:
        """A volume without its own mask: can another sequence's mask of the timepoint serve?"""
        stem = self.rel(volume_stem(self.site, pid, tp, seq, "mask"))
        where = f"patient {pid}, {self.rel(img.path)}{'/' if img.path.is_dir() else ''}"
        if self.cfg.data.require_masks:
            self.add("error", "no_mask", pid, f"{stem}.nii.gz",
                     f"{where}: no mask {stem}.nii.gz (data.require_masks is true); preprocessing will mark the "
                     "volume no_mask",
                     f"add the tumour mask {stem}.nii.gz, or set data.require_masks: false to allow another "
                     "sequence's mask of the same timepoint")
            return
        if img.error or not img.ok3d or img.info is None:
            return  # the image itself is already an error
        image_box = img.info.physical_bounds()
        tried: list[str] = []
        for other in self.cfg.data.mask_fallback:
            if other == seq:
                continue
            path = find_volume(self.site, pid, tp, other, "mask")
            if path is None:
                continue
            pr = self.probe(path, mask=True)
            usable, why = _mask_usable(pr)
            region = _mask_region(pr) if usable else None
            if usable and region is not None and _overlaps(region, image_box):
                self.add("warning", "mask_from_other_sequence", pid, f"{stem}.nii.gz",
                         f"{where}: no own mask {stem}.nii.gz; the {other} mask {self.rel(path)} overlaps the image "
                         "and will be resampled onto it in physical space",
                         f"nothing to do if the {other} mask fits the {seq} image; otherwise add {stem}.nii.gz")
                return
            tried.append(f"{self.rel(path)} {why or 'does not overlap the image in physical space'}")
        if tried:
            detail = f"the other masks of {tp} cannot serve: " + "; ".join(tried)
        else:
            detail = f"there is no mask at {tp} for any sequence"
        self.add("error", "no_mask", pid, f"{stem}.nii.gz",
                 f"{where}: no own mask {stem}.nii.gz and {detail}; the volume cannot yield a tumour slice and "
                 "preprocessing will mark it no_mask",
                 f"add the tumour mask {stem}.nii.gz (or a mask of another sequence at {tp}, listed in "
                 "data.mask_fallback)")


def check_site(site_dir: str | Path, cfg: RectalFLConfig, *, progress: Progress | None = None,
               read_pixels: bool = True) -> CheckReport:
    """Check a site's data against the contract; never raises on bad data.

    Parameters
    ----------
    site_dir : str or Path
        The site folder (``patients.csv``, ``images/``, ``masks/``, optional ``masks_rater2/``).
    cfg : RectalFLConfig
        ``cfg.data`` says which timepoints/sequences are required, which label is used, whether
        masks are required and which masks may stand in; ``cfg.check`` holds the tolerances.
    progress : callable, optional
        Called as ``progress(done, total, label)`` while volumes are checked.
    read_pixels : bool
        Read voxel data (NaN/inf, constant images, empty/non-binary/small masks, full integrity of
        ``.nii.gz``). False checks headers, geometry and layout only (fast).

    Returns
    -------
    CheckReport
        ``.ok`` is True when there is no error. Every problem is an :class:`Issue`
        (codes in :data:`ISSUE_CODES`); an unexpected exception on a file becomes an
        ``unexpected_error`` issue.

    Raises
    ------
    CohortError
        Only when ``site_dir`` itself does not exist or is not a folder.
    """
    site = Path(site_dir)
    if not site.is_dir():
        what = "is not a folder" if site.exists() else "not found"
        raise CohortError(f"{site}: site folder {what}; pass the folder holding patients.csv, images/ and masks/")
    return _SiteChecker(site, cfg, read_pixels, progress).run()


# --------------------------------------------------------------------------- the exclusion rule


def issue_volume(issue: Issue) -> tuple[str, str] | None:
    """``(timepoint, sequence)`` of the volume an issue is about (its image, mask or a file of its DICOM
    series), or None when it is about the patient as a whole (e.g. its label)."""
    if not issue.file:
        return None
    parts = Path(issue.file).parts
    if len(parts) < 4 or parts[0] not in KIND_DIRS.values() or parts[2] not in TIMEPOINTS:
        return None
    named = split_volume_name(parts[3])
    seq = named[0] if named else parts[3]
    return (parts[2], seq) if seq in SEQUENCES else None


def decide_exclusions(issues: list[Issue], rule: str) -> list[Exclusion]:
    """The one exclusion rule: what the errors among ``issues`` remove.

    Every error naming a patient removes data; warnings never do.

    - ``rule == "patient"`` (default): the whole patient, whatever the error.
    - ``rule == "volume"``: only the volume an error is about (its image, its own mask or a slice of its
      series; :func:`issue_volume`); an error not about one volume (label, id, patients.csv row)
      still removes the patient.

    ``site preprocess`` applies the same decisions (and the same rule to its own failures) and
    training uses only what preprocessing kept, so the three never disagree.

    Returns
    -------
    list of Exclusion
        One per (patient or volume, error), in the order of ``issues``.
    """
    if rule not in ("patient", "volume"):
        raise ValueError(f"exclusion rule must be 'patient' or 'volume', got {rule!r}")
    out: list[Exclusion] = []
    for i in issues:
        if i.severity != "error" or i.patient_id is None:
            continue
        vol = issue_volume(i)
        if rule == "volume" and vol is not None:
            out.append(Exclusion(i.patient_id, vol[0], vol[1], "volume", rule, i.code, i.file, i.message))
        else:
            out.append(Exclusion(i.patient_id, None, None, "patient", rule, i.code, i.file, i.message))
    return out


# --------------------------------------------------------------------------- what preprocessing consumes


def iter_volumes(site_dir: str | Path, cfg: RectalFLConfig) -> list[VolumeRecord]:
    """List the volumes preprocessing will consume.

    Parameters
    ----------
    site_dir : str or Path
    cfg : RectalFLConfig

    Returns
    -------
    list of VolumeRecord
        One per (patient in :func:`load_patients`, required timepoint, required sequence) whose
        image exists (resolved by :func:`find_volume`), in patient-file order, then
        ``cfg.data.timepoints`` and ``cfg.data.sequences`` order. ``mask_path`` is the volume's own
        mask or None (see :func:`find_fallback_mask`); ``mask2_path`` the second rater's or None.
        Patients with errors are included: exclusion is the check report's decision.

    Raises
    ------
    CohortError
        When the site folder or ``patients.csv`` is unusable (see :func:`load_patients`).
    """
    site = Path(site_dir)
    table = load_patients(site, cfg)
    out: list[VolumeRecord] = []
    for pid in table["patient_id"]:
        for tp in cfg.data.timepoints:
            for seq in cfg.data.sequences:
                image = find_volume(site, pid, tp, seq, "image")
                if image is None:
                    continue
                out.append(VolumeRecord(
                    patient_id=str(pid), timepoint=tp, sequence=seq, image_path=image,
                    mask_path=find_volume(site, pid, tp, seq, "mask"),
                    mask2_path=find_volume(site, pid, tp, seq, "mask_rater2"),
                ))
    return out


def find_fallback_mask(site_dir: str | Path, patient_id: str, timepoint: str, sequence: str,
                       cfg: RectalFLConfig, *, image_path: str | Path | None = None) -> Path | None:
    """The mask of another sequence that may stand in for a volume without its own mask.

    The first of ``cfg.data.mask_fallback`` (other than ``sequence``) whose mask exists at the same
    timepoint, is readable, 3-D, non-empty and binary (or {0, k}), and whose foreground overlaps the
    image in physical space -- the same choice :func:`check_site` reports as
    ``mask_from_other_sequence``. It must be resampled onto the image (nearest neighbour).

    Parameters
    ----------
    site_dir : str or Path
    patient_id, timepoint, sequence : str
    cfg : RectalFLConfig
    image_path : str or Path, optional
        The image; found with :func:`find_volume` when omitted.

    Returns
    -------
    Path or None
        None when the volume has its own mask, ``cfg.data.require_masks`` is true, the image is
        missing or unreadable, or no other mask qualifies.
    """
    site = Path(site_dir)
    if cfg.data.require_masks or find_volume(site, patient_id, timepoint, sequence, "mask") is not None:
        return None
    image = Path(image_path) if image_path is not None else find_volume(site, patient_id, timepoint, sequence)
    if image is None:
        return None
    img = _probe(image, pixels=False, mask=False)
    if img.error or not img.ok3d or img.info is None:
        return None
    box = img.info.physical_bounds()
    for other in cfg.data.mask_fallback:
        if other == sequence:
            continue
        path = find_volume(site, patient_id, timepoint, other, "mask")
        if path is None:
            continue
        pr = _probe(path, pixels=True, mask=True)
        usable, _ = _mask_usable(pr)
        region = _mask_region(pr) if usable else None
        if region is not None and _overlaps(region, box):
            return path
    return None
