"""Finding and reading the image and mask files of a site (the file half of the site data contract).

A volume is one file ``<seq>.<ext>`` with ``ext`` in :data:`EXTENSIONS` (tried in that order) or a
DICOM series folder ``<seq>/`` under ``<root>/<patient_id>/<timepoint>/``, where ``root`` is
``images``, ``masks`` or ``masks_rater2`` (:data:`KIND_DIRS`).

Everything public here is re-exported by :mod:`shared.cohort`; import from there.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from shared.cohort_types import CohortError

logger = logging.getLogger(__name__)

EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
"""File extensions of a volume, in the order :func:`find_volume` tries them."""

Kind = Literal["image", "mask", "mask_rater2"]
KIND_DIRS: dict[str, str] = {"image": "images", "mask": "masks", "mask_rater2": "masks_rater2"}
"""Top-level folder of each kind of volume."""

NONFINITE_FIX = ("a volume with NaN/inf voxels is excluded everywhere (site check, preprocessing, training); "
                 "re-export it from the original DICOM, or fix the conversion that produced the NaNs")

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VolumeInfo:
    """Header information of a volume (no pixel data).

    Attributes
    ----------
    size : tuple of int
        Voxels per axis, ITK order (x, y, z).
    spacing, origin : tuple of float
        Millimetres, ITK order.
    direction : tuple of float
        Row-major direction cosines, ``dimension ** 2`` values.
    dimension : int
    components : int
        Components per voxel (1 for a scalar image).
    pixel_type : str
        SimpleITK's name of the pixel type, e.g. ``"32-bit float"``.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    dimension: int
    components: int
    pixel_type: str

    @classmethod
    def from_image(cls, img: sitk.Image) -> VolumeInfo:
        """Return the header of an image in memory."""
        return cls(
            size=tuple(int(s) for s in img.GetSize()),
            spacing=tuple(float(s) for s in img.GetSpacing()),
            origin=tuple(float(o) for o in img.GetOrigin()),
            direction=tuple(float(d) for d in img.GetDirection()),
            dimension=int(img.GetDimension()),
            components=int(img.GetNumberOfComponentsPerPixel()),
            pixel_type=str(img.GetPixelIDTypeAsString()),
        )

    def physical_bounds(self, lo_index: np.ndarray | None = None,
                        hi_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned physical bounding box (mm) of the voxel box ``[lo_index, hi_index]``.

        Parameters
        ----------
        lo_index, hi_index : ndarray of shape (dimension,), optional
            Inclusive voxel index range in ITK order; the whole grid when omitted.

        Returns
        -------
        (ndarray, ndarray)
            Lower and upper corners, shape ``(dimension,)``, including the half-voxel borders.
        """
        d = self.dimension
        lo = np.zeros(d) if lo_index is None else np.asarray(lo_index, float)
        hi = np.asarray(self.size, float) - 1 if hi_index is None else np.asarray(hi_index, float)
        lo, hi = lo - 0.5, hi + 0.5
        corners = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi, strict=True)], indexing="ij"))
        corners = corners.reshape(d, -1)
        mat = np.asarray(self.direction, float).reshape(d, d) * np.asarray(self.spacing, float)[None, :]
        pts = np.asarray(self.origin, float)[:, None] + mat @ corners
        return pts.min(axis=1), pts.max(axis=1)


# --------------------------------------------------------------------------- locating files


def volume_stem(site_dir: str | Path, patient_id: str, timepoint: str, sequence: str,
                kind: Kind | str = "image") -> Path:
    """Return ``<site>/<root>/<patient_id>/<timepoint>/<sequence>`` (no extension).

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    if kind not in KIND_DIRS:
        raise ValueError(f"kind must be one of {sorted(KIND_DIRS)}, got {kind!r}")
    return Path(site_dir) / KIND_DIRS[kind] / str(patient_id) / str(timepoint) / str(sequence)


def _non_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())
    except OSError:
        return False


def volume_candidates(site_dir: str | Path, patient_id: str, timepoint: str, sequence: str,
                      kind: Kind | str = "image") -> list[Path]:
    """Every file or DICOM folder that could be this volume, in :func:`find_volume`'s order.

    More than one candidate means the volume is ambiguous. An empty folder is not a candidate.
    """
    stem = volume_stem(site_dir, patient_id, timepoint, sequence, kind)
    found = [stem.with_name(stem.name + ext) for ext in EXTENSIONS]
    found = [p for p in found if p.is_file()]
    if _non_empty_dir(stem):
        found.append(stem)
    return found


def find_volume(site_dir: str | Path, patient_id: str, timepoint: str, sequence: str,
                kind: Kind | str = "image") -> Path | None:
    """Locate one volume of a patient.

    Tries ``<sequence>.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, then a non-empty DICOM folder
    ``<sequence>/`` under ``<site>/<images|masks|masks_rater2>/<patient_id>/<timepoint>/``.

    Parameters
    ----------
    site_dir : str or Path
    patient_id, timepoint, sequence : str
    kind : {"image", "mask", "mask_rater2"}

    Returns
    -------
    Path or None
        The first candidate, or None when there is none. When there are several,
        :func:`shared.cohort.check_site` reports an ``ambiguous_file`` error.
    """
    found = volume_candidates(site_dir, patient_id, timepoint, sequence, kind)
    return found[0] if found else None


def split_volume_name(name: str) -> tuple[str, str] | None:
    """Split ``"t2w.nii.gz"`` into ``("t2w", ".nii.gz")``; None when the extension is not accepted."""
    for ext in EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


# --------------------------------------------------------------------------- reading


def _itk_reason(exc: BaseException) -> str:
    """Shorten a SimpleITK/ITK exception to its informative line."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "no image reader recognises the file (corrupt, truncated, or not an image)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "ERROR" in ln or "trouble" in ln or "Reason" in ln or "expected" in ln]
    msg = " ".join(keep or lines[-2:])
    msg = re.sub(r"/\S+\.(cxx|h|hxx):\d+:\s*", "", msg)
    msg = re.sub(r"\(0x[0-9a-fA-F]+\)", "", msg)
    msg = re.sub(r"\s+", " ", msg).strip()
    return msg[:300] or type(exc).__name__


def dicom_series_files(folder: Path) -> tuple[list[str], int]:
    """The files of the DICOM series with the most files in ``folder``.

    Returns
    -------
    (list of str, int)
        The chosen series' files (sorted by GDCM into slice order) and the number of series found.

    Raises
    ------
    CohortError
        When the folder holds no DICOM series.
    """
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:  # pragma: no cover - GDCM failure
        raise CohortError(f"{folder}: cannot scan the DICOM folder: {_itk_reason(exc)}") from None
    best: list[str] = []
    for sid in series:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
        if len(files) > len(best):
            best = files
    if not best:
        n = sum(1 for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else 0
        sub = " (DICOM files in sub-folders are not searched)" if any(p.is_dir() for p in folder.iterdir()) else ""
        raise CohortError(
            f"{folder}: no DICOM series found among its {n} entr{'y' if n == 1 else 'ies'}{sub}; "
            "put the .dcm files of one series directly in this folder, or convert it to NIfTI"
        )
    return best, len(series)


@dataclass(frozen=True)
class SeriesProblem:
    """A damaged DICOM series: ``code`` is one of ``dicom_missing_slices``, ``dicom_duplicate_slices``,
    ``dicom_empty_file``, ``dicom_nonuniform_spacing``; ``message`` says where (file names, positions)."""

    code: str
    message: str


SERIES_FIX = ("re-export the whole series from the PACS/scanner (every slice, once), or convert it with dcm2niix "
              "and check its report; ITK would stack the slices it finds as if they were evenly spaced, so the "
              "volume's geometry and its mask's fit would be wrong")


def _slice_position(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient, slice normal from ImageOrientationPatient) of one DICOM file, or None."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        ipp = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        iop = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return None
    if len(ipp) != 3 or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    return np.asarray(ipp), normal


def dicom_series_problems(folder: str | Path, files: list[str]) -> list[SeriesProblem]:
    """Missing, duplicate or zero-byte slices and non-uniform slice spacing in a DICOM series folder.

    Reads each slice's header (ImagePositionPatient, ImageOrientationPatient): slice positions along
    the normal are sorted; a step of (nearly) 0 is a duplicate slice, a step of about k times the
    typical one a gap of k - 1 missing slices, other unequal steps non-uniform spacing (more than 1%
    and 0.01 mm from the median step). A zero-byte file in the folder is a slice that was not copied.

    Parameters
    ----------
    folder : str or Path
    files : list of str
        The series' files, as :func:`dicom_series_files` returns them.

    Returns
    -------
    list of SeriesProblem
        Empty for a sound series (or when the headers carry no positions to check).
    """
    folder = Path(folder)
    out: list[SeriesProblem] = []
    empty = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.stat().st_size == 0)
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        out.append(SeriesProblem("dicom_empty_file", f"{len(empty)} empty (0-byte) file(s) in the series folder "
                                                     f"({shown}): slice(s) that were not copied"))
    pos = [(_slice_position(f), Path(f).name) for f in files]
    if len(pos) < 2 or any(p is None for p, _ in pos):
        return out
    normal = pos[0][0][1]  # type: ignore[index]
    depth = sorted((float(np.dot(p[0], normal)), name) for p, name in pos)  # type: ignore[index]
    z = np.array([d for d, _ in depth])
    steps = np.diff(z)
    moving = steps[steps > 1e-3]
    if not moving.size:
        return out
    typical = float(np.median(moving))
    dups = [(depth[i][1], depth[i + 1][1]) for i in np.nonzero(steps <= max(1e-3, 0.01 * typical))[0]]
    if dups:
        shown = "; ".join(f"{a} and {b}" for a, b in dups[:3]) + ("; ..." if len(dups) > 3 else "")
        out.append(SeriesProblem("dicom_duplicate_slices", f"{len(dups)} slice position(s) occur twice ({shown})"))
    gaps = [(i, int(round(s / typical)) - 1) for i, s in enumerate(steps) if s > 1.5 * typical]
    if gaps:
        n = sum(k for _, k in gaps)
        where = "; ".join(f"between {depth[i][1]} ({z[i]:.4g} mm) and {depth[i + 1][1]} ({z[i + 1]:.4g} mm)"
                          for i, _ in gaps[:3])
        out.append(SeriesProblem("dicom_missing_slices",
                                 f"about {max(n, 1)} slice(s) missing: the slices are {typical:.4g} mm apart except "
                                 f"{where}"))
    regular = moving[moving <= 1.5 * typical]
    if not gaps and regular.size and float(np.max(np.abs(regular - typical))) > max(0.01, 0.01 * typical):
        out.append(SeriesProblem("dicom_nonuniform_spacing",
                                 f"slice spacing varies from {regular.min():.4g} to {regular.max():.4g} mm "
                                 f"(median {typical:.4g} mm)"))
    return out


def _read_dicom(folder: Path, files: list[str] | None = None) -> sitk.Image:
    if files is None:
        files, n_series = dicom_series_files(folder)
        if n_series > 1:
            logger.warning("%s: %d DICOM series found; using the one with most files (%d)",
                           folder, n_series, len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # ITK's own "Non uniform sampling or missing slices" goes to the terminal, unattributed;
    # dicom_series_problems reports it per file instead.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise CohortError(f"{folder}: cannot read the DICOM series: {_itk_reason(exc)}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


_NIFTI_FLOAT = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float voxels


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a single-file NIfTI keeps its voxels."""

    offset: int
    nbytes: int
    dtype: np.dtype | None  # set for float data (the only kind that can hold NaN/inf)

    @property
    def expected(self) -> int:
        return self.offset + self.nbytes


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Parse a NIfTI-1/-2 single-file header; None when ``header`` is not one."""
    if len(header) < 352:
        return None
    for end in "<>":
        size = struct.unpack(end + "i", header[:4])[0]
        if size == 348 and header[344:347] == b"n+1":
            dim = struct.unpack(end + "8h", header[40:56])
            datatype = struct.unpack(end + "h", header[70:72])[0]
            bitpix = struct.unpack(end + "h", header[72:74])[0]
            offset = struct.unpack(end + "f", header[108:112])[0]
        elif size == 540 and len(header) >= 540 and header[4:7] == b"n+2":
            datatype = struct.unpack(end + "h", header[12:14])[0]
            bitpix = struct.unpack(end + "h", header[14:16])[0]
            dim = struct.unpack(end + "8q", header[16:80])
            offset = struct.unpack(end + "q", header[168:176])[0]
        else:
            continue
        ndim = int(dim[0])
        if not 1 <= ndim <= 7 or bitpix <= 0 or not math.isfinite(offset):
            return None
        nvox = 1
        for n in dim[1: ndim + 1]:
            nvox *= max(int(n), 1)
        code = _NIFTI_FLOAT.get(int(datatype))
        return _NiftiLayout(max(int(offset), size + 4), nvox * int(bitpix) // 8,
                            np.dtype(end + code) if code else None)
    return None


def _is_nifti(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nonfinite(data: bytes | memoryview, layout: _NiftiLayout) -> int:
    if layout.dtype is None:
        return 0
    n = layout.nbytes // layout.dtype.itemsize
    arr = np.frombuffer(data, dtype=layout.dtype, count=n, offset=layout.offset)
    return int(n - np.count_nonzero(np.isfinite(arr)))


def scan_nifti(path: str | Path, *, full: bool = True) -> tuple[str | None, int | None]:
    """Check a NIfTI file for truncation/corruption and count its non-finite voxels.

    ITK reads a truncated NIfTI silently (missing voxels become 0) and replaces NaN/inf voxels of
    a NIfTI file with 0 on reading, so both are checked on the raw file.

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` file (anything else gives ``(None, None)``).
    full : bool
        Read all the voxel data: verifies the gzip CRC and counts NaN/inf voxels. When False only
        the sizes are compared (for ``.nii.gz`` the size in the gzip trailer, decompressing fully
        only when it disagrees) and no voxels are counted.

    Returns
    -------
    (str or None, int or None)
        The problem (None when the file is complete) and the number of NaN/inf voxels (None when
        not counted: ``full`` is False, the file is not NIfTI, or it is broken).
    """
    p = Path(path)
    if not _is_nifti(p):
        return None, None
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if magic != _GZIP_MAGIC:  # uncompressed (also an uncompressed file named .nii.gz: ITK reads it)
        with open(p, "rb") as fh:
            layout = _nifti_layout(fh.read(544))
        have = p.stat().st_size
        if layout is None:
            return None, None
        if have < layout.expected:
            return f"truncated: the file has {have} bytes but its header needs {layout.expected}", None
        if not full:
            return None, None
        return None, _nonfinite(np.memmap(p, dtype=np.uint8, mode="r"), layout)
    if not full:
        head, _, problem = _gunzip(p, limit=544)
        if problem:
            return problem, None
        layout = _nifti_layout(head)
        with open(p, "rb") as fh:
            fh.seek(-4, 2)
            isize = struct.unpack("<I", fh.read(4))[0]
        if layout is None or isize == layout.expected % (1 << 32):
            return None, None
    data, total, problem = _gunzip(p, keep=True)
    if problem:
        return problem, None
    layout = _nifti_layout(data[:544])
    if layout is None:
        return None, None
    if total < layout.expected:
        return f"truncated: it decompresses to {total} bytes but its header needs {layout.expected}", None
    return None, _nonfinite(data, layout)


def verify_file_integrity(path: str | Path, *, full: bool = True) -> str | None:
    """Detect a truncated or corrupt NIfTI file (which ITK would read silently); see :func:`scan_nifti`.

    Returns
    -------
    str or None
        The problem, or None when the file is complete (or not NIfTI: ITK itself detects truncated
        NRRD and MetaImage files).
    """
    return scan_nifti(path, full=full)[0]


def _gunzip(path: Path, limit: int | None = None, keep: bool = False) -> tuple[bytes, int, str | None]:
    """Decompress every gzip member of ``path``; report a truncated or corrupt stream.

    Parameters
    ----------
    path : Path
    limit : int, optional
        Stop once this many bytes are decompressed.
    keep : bool
        Return all decompressed bytes (otherwise only the first 1024).

    Returns
    -------
    (bytes, int, str or None)
        The decompressed bytes kept, the decompressed size, and the problem (None if fine).
    """
    parts: list[bytes] = []
    head = b""
    total = 0
    dec = zlib.decompressobj(wbits=31)
    in_member = False
    with open(path, "rb") as fh:
        pending = b""
        while True:
            chunk = pending or fh.read(_CHUNK)
            pending = b""
            if not chunk:
                break
            in_member = True
            try:
                out = dec.decompress(chunk)
            except zlib.error as exc:
                return b"".join(parts) if keep else head, total, f"corrupt gzip data ({exc})"
            total += len(out)
            if keep:
                parts.append(out)
            elif len(head) < 1024:
                head += out[: 1024 - len(head)]
            if limit is not None and total >= limit:
                return b"".join(parts) if keep else head, total, None
            if dec.eof:
                pending = dec.unused_data
                dec = zlib.decompressobj(wbits=31)
                in_member = False
                if pending and not pending.strip(b"\x00"):
                    pending = b""  # zero padding after the last member is tolerated
    data = b"".join(parts) if keep else head
    if in_member:
        return data, total, "truncated: the compressed stream ends before its end marker"
    return data, total, None


def read_volume_info(path: str | Path) -> VolumeInfo:
    """Read the header of a volume file without its voxels (a DICOM folder is read whole).

    Raises
    ------
    CohortError
        Naming the path and the reason when it is missing, empty or unreadable.
    """
    p = Path(path)
    if p.is_dir():
        return VolumeInfo.from_image(read_image(p, verify=False))
    _check_exists(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CohortError(f"{p}: cannot read the image header: {_file_reason(p, exc)}") from None
    dim = int(reader.GetDimension())
    return VolumeInfo(
        size=tuple(int(s) for s in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
        dimension=dim,
        components=int(reader.GetNumberOfComponents()),
        pixel_type=str(sitk.GetPixelIDValueAsString(reader.GetPixelID())),
    )


def _check_exists(p: Path) -> None:
    if not p.exists():
        raise CohortError(f"{p}: file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise CohortError(f"{p}: the file is empty (0 bytes); re-export it")


def _file_reason(p: Path, exc: BaseException) -> str:
    reason = _itk_reason(exc)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        return reason
    if p.name.lower().endswith(".gz") and magic[:2] != _GZIP_MAGIC:
        return "not gzip-compressed although named .gz, and not a recognised image format (corrupt or not an image)"
    if p.name.lower().endswith(".gz"):
        problem = _gunzip(p)[2]
        if problem:
            return problem
    reason = reason.replace(" Reason: No such file or directory", "")
    if "File cannot be read" in reason or "fread got only" in reason or "expected" in reason:
        return f"the voxel data cannot be read completely (truncated or corrupt file): {reason}"
    return reason


def read_dicom_series(folder: str | Path, files: list[str]) -> sitk.Image:
    """Read the DICOM series made of ``files`` (from :func:`dicom_series_files`) in ``folder``.

    Raises
    ------
    CohortError
        Naming the folder when the series cannot be read or has no voxels.
    """
    img = _read_dicom(Path(folder), files)
    if img.GetNumberOfPixels() == 0:
        raise CohortError(f"{folder}: the DICOM series has no voxels; re-export it")
    return img


def read_image(path: str | Path, *, verify: bool = True) -> sitk.Image:
    """Read a volume: a file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) or a DICOM series folder.

    For a folder, the DICOM series with the most files is read (GDCM orders the slices).

    Parameters
    ----------
    path : str or Path
    verify : bool
        Refuse what ITK would read silently but wrongly: a truncated/corrupt NIfTI file (missing
        voxels read as 0; costs one more decompression), NaN/inf voxels (read as 0 from NIfTI; kept
        as NaN from other formats), a DICOM series with missing, duplicate or zero-byte slices or
        non-uniform spacing (:func:`dicom_series_problems`). The same faults :func:`check_site`
        reports, so every consumer of a volume applies one rule.

    Returns
    -------
    SimpleITK.Image

    Raises
    ------
    CohortError
        Naming the path and the reason: missing, empty (0 bytes, no voxels, no DICOM series),
        truncated, corrupt, unreadable, NaN/inf voxels, damaged DICOM series (with ``verify``).
    """
    p = Path(path)
    if p.is_dir():
        files, n_series = dicom_series_files(p)
        if verify:
            problems = dicom_series_problems(p, files)
            if problems:
                raise CohortError(f"{p}: damaged DICOM series: " + "; ".join(x.message for x in problems)
                                  + f"; {SERIES_FIX}")
        if n_series > 1:
            logger.warning("%s: %d DICOM series found; using the one with most files (%d)", p, n_series, len(files))
        img = _read_dicom(p, files)
    else:
        _check_exists(p)
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise CohortError(f"{p}: cannot read the image: {_file_reason(p, exc)}") from None
        if verify:
            problem, nonfinite = scan_nifti(p, full=True)
            if problem:
                raise CohortError(f"{p}: {problem}; re-export or re-copy the file")
            if nonfinite:
                raise CohortError(f"{p}: {nonfinite} voxel(s) are NaN or infinite (ITK would read them as 0); "
                                  f"{NONFINITE_FIX}")
    if img.GetNumberOfPixels() == 0:
        raise CohortError(f"{p}: the image has no voxels (size {img.GetSize()}); re-export it")
    if verify and img.GetNumberOfComponentsPerPixel() == 1 and "float" in img.GetPixelIDTypeAsString():
        bad = int(np.size(sitk.GetArrayViewFromImage(img)) - np.count_nonzero(np.isfinite(
            sitk.GetArrayViewFromImage(img))))
        if bad:
            raise CohortError(f"{p}: {bad} voxel(s) are NaN or infinite; {NONFINITE_FIX}")
    return img
