"""Per-site preprocessing: from a site's MRI volumes to one cached 2-D largest-tumour slice per volume.

Everything here runs at the hospital; the cache never leaves the site.

Pipeline for one volume: see :mod:`client.image_ops` (the operations) and
:func:`preprocess_volume` (their order for one volume).

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
``CACHE_DIR/exclusions.csv``
    every exclusion decision (:data:`shared.cohort.EXCLUSION_COLUMNS`): which patient or volume, by
    which rule (``check.exclusion``), for which issue or preprocessing failure.
``CACHE_DIR/check.json``
    the site check this cache was built under (:func:`site_check`), reused while the site's files
    and the ``data``/``check`` settings are unchanged.

The exclusion rule
------------------
Preprocessing applies the site check's decisions (:func:`shared.cohort.decide_exclusions`): a
volume the check removes is not computed and its row says ``status = excluded`` and
``excluded_by = check:<code>``. Its own failures (``error``, ``no_mask``) follow the same rule: with
``check.exclusion: patient`` (default) the patient's other volumes become ``excluded``
(``excluded_by = patient rule: <timepoint>/<sequence> <status>``). Training reads only ``ok``
volumes and leaves patient-level exclusions out altogether, so the check, preprocessing and
training never disagree (``docs/site.md``, "The exclusion rule").

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
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from client.atomic import atomic_write
from client.image_ops import (  # noqa: F401 - re-exported: the preprocessing API
    MaskGeometryError,
    NoMaskError,
    SliceResult,
    _as_float3d,
    check_mask_geometry,
    denoise,
    discretise,
    extract_slice,
    foreground_mask,
    largest_slice,
    mask_onto_image,
    n4_correct,
    n4_correct_full_resolution,
    n4_shrink_factors,
    normalise,
    physical_bounds,
    resample_mask,
    resample_to_spacing,
    same_grid,
)
from shared.config import RectalFLConfig

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
    "excluded_by",
)
"""Columns of ``manifest.csv``. ``status`` is ok | error | no_mask | excluded; ``mask_source`` own |
<sequence> | none; ``error`` is empty when ok (for ``excluded``: why); ``path`` is the npz path relative
to the cache folder (empty when not ok); ``slice_index`` is -1 and ``tumour_area_px`` 0 when not ok;
``seconds`` is the compute time of the run that produced the result; ``source`` the image path
relative to the site folder; ``excluded_by`` which rule removed the volume (``check:<code>`` or
``patient rule: <timepoint>/<sequence> <status>``), empty otherwise."""

EXCLUSIONS_FILE = "exclusions.csv"
CHECK_FILE = "check.json"
CHECK_VERSION = 2
"""Bumped when the site check finds different issues for the same files (part of :func:`site_fingerprint`)."""

ProgressFn = Callable[[int, int, str], None]


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
                              convergence_threshold=pp.n4.convergence_threshold,
                              fit_spacing_mm=pp.n4.fit_spacing_mm)
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


_atomic_write = atomic_write  # the cache files: whole or not at all


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
        "excluded_by": "",
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
    from shared.interrupt import ignore_in_worker

    ignore_in_worker()  # Ctrl-C is the parent's to handle: it lets the volumes in flight finish and stops
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))


# --------------------------------------------------------------------------- the site check and exclusions


def site_fingerprint(site_dir: Path | str, cfg: RectalFLConfig) -> str:
    """Hash of what the site check depends on: every file of the site (path, size, modification time),
    the ``data`` and ``check`` settings (less ``check.exclusion``, applied afterwards) and :data:`CHECK_VERSION`."""
    site_dir = Path(site_dir)
    items: list[Any] = [_stat_entry(site_dir / "patients.csv", site_dir)]
    for root in ("images", "masks", "masks_rater2"):
        base = site_dir / root
        if base.is_dir():
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                for name in sorted(filenames):
                    items.append(_stat_entry(Path(dirpath) / name, site_dir))
    check = cfg.check.model_dump(mode="json")
    check.pop("exclusion", None)
    blob = json.dumps({"version": CHECK_VERSION, "files": items, "data": cfg.data.model_dump(mode="json"),
                       "check": check}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def site_check(site_dir: Path | str, cache_dir: Path | str, cfg: RectalFLConfig, *,
               progress: ProgressFn | None = None) -> Any:
    """The site check (:func:`shared.cohort.check_site`, pixels read) behind this cache, reused from
    ``cache_dir/check.json`` while :func:`site_fingerprint` is unchanged; decisions follow ``cfg.check.exclusion``."""
    from shared.cohort import CheckReport, check_site, decide_exclusions

    site_dir, cache_dir = Path(site_dir), Path(cache_dir)
    fp = site_fingerprint(site_dir, cfg)
    path = cache_dir / CHECK_FILE
    report = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == fp:
                report = CheckReport.from_dict(saved["report"])
        except (OSError, ValueError, KeyError, TypeError):
            report = None
    if report is None:
        logger.info("checking %s (the exclusion rule needs the site check)", site_dir)
        report = check_site(site_dir, cfg, progress=progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": fp, "report": report.to_dict()}
        _atomic_write(path, lambda fh: fh.write(json.dumps(payload, default=str)), mode="w")
    if report.rule != cfg.check.exclusion:
        report.rule = cfg.check.exclusion
        report.exclusions = decide_exclusions(report.issues, cfg.check.exclusion)
    return report


def load_exclusions(cache_dir: Path | str) -> pd.DataFrame:
    """``cache_dir/exclusions.csv`` (empty when the cache has none, e.g. built before the exclusion rule)."""
    from shared.cohort import EXCLUSION_COLUMNS

    path = Path(cache_dir) / EXCLUSIONS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=list(EXCLUSION_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])


def excluded_patients(cache_dir: Path | str) -> set[str]:
    """Patients the exclusion rule removed entirely (training leaves them out of every volume and split)."""
    df = load_exclusions(cache_dir)
    return set(df.loc[df["scope"] == "patient", "patient_id"].astype(str))


def exclusion_summary(cache_dir: Path | str) -> dict[str, Any] | None:
    """Counts only (no patient id): patients and volumes excluded, by code, and the rule; None without a record."""
    path = Path(cache_dir) / EXCLUSIONS_FILE
    if not path.is_file():
        return None
    df = load_exclusions(cache_dir)
    pats = df[df["scope"] == "patient"]
    vols = df[df["scope"] == "volume"]
    vols = vols[~vols["patient_id"].isin(set(pats["patient_id"]))]
    by_code = df.drop_duplicates(["patient_id", "timepoint", "sequence", "code"])["code"].value_counts()
    rule = str(df["rule"].iloc[0]) if len(df) else ""
    return {"rule": rule, "patients": int(pats["patient_id"].nunique()),
            "volumes": int(vols[["patient_id", "timepoint", "sequence"]].drop_duplicates().shape[0]),
            "by_code": {str(k): int(v) for k, v in by_code.items()}}


def _apply_rule(rows: dict[int, dict[str, Any]], report: Any, rule: str) -> list[dict[str, Any]]:
    """Preprocessing's own failures follow the rule too; returns every exclusion (check + preprocessing)."""
    from shared.cohort import Exclusion

    out = [e.to_dict() for e in report.exclusions]
    failed: dict[str, str] = {}
    for row in rows.values():
        if row["status"] in ("error", "no_mask"):
            pid, where = row["patient_id"], f"{row['timepoint']}/{row['sequence']} {row['status']}"
            failed.setdefault(pid, where)
            scope = "patient" if rule == "patient" else "volume"
            out.append(Exclusion(pid, None if scope == "patient" else row["timepoint"],
                                 None if scope == "patient" else row["sequence"], scope, rule,
                                 f"preprocess_{row['status']}", row["source"], row["error"]).to_dict())
    if rule == "patient":
        for row in rows.values():
            if row["status"] == "ok" and row["patient_id"] in failed:
                row.update(status="excluded", excluded_by=f"patient rule: {failed[row['patient_id']]}",
                           error=f"the patient is excluded: {failed[row['patient_id']]}", path="",
                           slice_index=-1, tumour_area_px=0)
    return out


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
    check: Any = None,
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
    check : shared.cohort.CheckReport, optional
        The site check of these files (e.g. just printed by the caller); by default
        :func:`site_check` (reused from the cache when the site is unchanged). Its exclusions are
        applied (module docstring, "The exclusion rule").

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
    report = check if check is not None else site_check(site_dir, cache_dir, cfg)
    rule = cfg.check.exclusion
    if report.rule != rule:
        from shared.cohort import decide_exclusions

        report.rule, report.exclusions = rule, decide_exclusions(report.issues, rule)
    out_patients = {e.patient_id: e for e in reversed(report.exclusions) if e.scope == "patient"}
    out_volumes = {(e.patient_id, e.timepoint, e.sequence): e for e in reversed(report.exclusions)
                   if e.scope == "volume"}
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
        hit = out_patients.get(rec.patient_id) or out_volumes.get((rec.patient_id, rec.timepoint, rec.sequence))
        if hit is not None:
            rows[i] = _row(rec, site_dir, status="excluded", error=hit.reason, excluded_by=f"check:{hit.code}",
                           fingerprint=fp)
            continue
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
        from shared.interrupt import sigint_held_from_children

        with sigint_held_from_children():  # a Ctrl-C is the parent's, even while a worker starts
            ex = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(threads,))
            futures = {ex.submit(_process_one, rec, cfg, site_dir, cache_dir, fp, sig, options): (i, rec)
                       for i, rec, sig in todo}
        try:
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

    from shared.cohort import EXCLUSION_COLUMNS

    excl = pd.DataFrame(_apply_rule(rows, report, rule), columns=list(EXCLUSION_COLUMNS))
    _atomic_write(cache_dir / EXCLUSIONS_FILE, lambda fh: excl.to_csv(fh, index=False), mode="w")
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
                 "fingerprint", "excluded_by"]
    df = pd.read_csv(path, dtype=dict.fromkeys(text_cols, str), keep_default_na=False, na_values=[])
    if "excluded_by" not in df:  # a manifest written before the exclusion rule
        df["excluded_by"] = ""
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
