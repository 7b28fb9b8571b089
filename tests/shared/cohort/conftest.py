"""Fixtures of the site-contract tests: a tiny, valid site built with SimpleITK in tmp_path.

The clean site has 3 patients (P001-P003), timepoints pre+post, sequences t2w+dwi. T2W volumes are
16x16x4 at 0.7x0.7x4 mm, DWI 8x8x4 at 1.4x1.4x4 mm (same physical extent), each with its own
binary mask (32 foreground voxels); P001's pre T2W also has a second-rater mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from shared.cohort import ISSUE_CODES, CheckReport, Issue, check_site
from shared.config import RectalFLConfig, parse_config

PATIENTS = ("P001", "P002", "P003")
GRIDS: dict[str, dict[str, Any]] = {
    "t2w": {"size": (16, 16, 4), "spacing": (0.7, 0.7, 4.0)},
    "dwi": {"size": (8, 8, 4), "spacing": (1.4, 1.4, 4.0)},
}
ORIGIN = (-5.0, -5.0, 0.0)
CSV_HEADER = "patient_id,trg,response,age,sex,cea,t_stage"
CSV_ROWS = ("P001,0,1,61,M,3.2,T3", "P002,2,0,55,F,1.0,T3b", "P003,3,0,70,M,8.5,T4a")


def make_volume(seq: str, seed: int = 0, **override: Any) -> sitk.Image:
    """A noisy float32 volume on the sequence's grid (tumour brighter in the centre)."""
    g = {**GRIDS[seq], "origin": ORIGIN, **override}
    nx, ny, nz = g["size"]
    rng = np.random.default_rng(seed)
    arr = rng.normal(100.0, 10.0, size=(nz, ny, nx)).astype(np.float32)
    arr[:, ny // 4: 3 * ny // 4, nx // 4: 3 * nx // 4] += 50.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(g["spacing"])
    img.SetOrigin(g["origin"])
    return img


def make_mask(seq: str, value: int = 1, **override: Any) -> sitk.Image:
    """A uint8 box mask (32 voxels) in the centre of the sequence's grid."""
    g = {**GRIDS[seq], "origin": ORIGIN, **override}
    nx, ny, nz = g["size"]
    arr = np.zeros((nz, ny, nx), np.uint8)
    cx, cy = nx // 2, ny // 2
    arr[1:3, cy - 2: cy + 2, cx - 2: cx + 2] = value
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(g["spacing"])
    img.SetOrigin(g["origin"])
    return img


@dataclass
class Site:
    """A site folder under construction, with helpers to corrupt it."""

    root: Path
    cfg: RectalFLConfig

    def path(self, pid: str, tp: str, seq: str, kind: str = "image", ext: str = ".nii.gz") -> Path:
        root = {"image": "images", "mask": "masks", "mask_rater2": "masks_rater2"}[kind]
        return self.root / root / pid / tp / f"{seq}{ext}"

    def rel(self, pid: str, tp: str, seq: str, kind: str = "image", ext: str = ".nii.gz") -> str:
        return self.path(pid, tp, seq, kind, ext).relative_to(self.root).as_posix()

    def write(self, img: sitk.Image, pid: str, tp: str, seq: str, kind: str = "image",
              ext: str = ".nii.gz") -> Path:
        p = self.path(pid, tp, seq, kind, ext)
        p.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(p))
        return p

    def write_csv(self, header: str = CSV_HEADER, rows: tuple[str, ...] | list[str] = CSV_ROWS) -> Path:
        p = self.root / "patients.csv"
        p.write_text("\n".join([header, *rows]) + "\n")
        return p

    def check(self, cfg: RectalFLConfig | None = None, **kwargs: Any) -> CheckReport:
        """Run the checker and assert invariants every report must keep."""
        report = check_site(self.root, cfg or self.cfg, **kwargs)
        unknown = {i.code for i in report.issues} - set(ISSUE_CODES)
        assert not unknown, f"codes missing from ISSUE_CODES: {unknown}"
        for i in report.issues:
            assert i.severity == ISSUE_CODES[i.code][0], i
            assert i.message and i.fix, i
        return report


def _config(**data: Any) -> RectalFLConfig:
    base: dict[str, Any] = {"data": {"sequences": ["t2w", "dwi"], "timepoints": ["pre", "post"]}}
    for key, value in data.items():
        base.setdefault(key, {}).update(value)
    return parse_config(base)


@pytest.fixture
def make_cfg() -> Callable[..., RectalFLConfig]:
    """Build a config: t2w+dwi, pre+post, with section overrides, e.g. ``make_cfg(data={...})``."""
    return _config


@pytest.fixture
def cfg() -> RectalFLConfig:
    """The tests' default config: t2w+dwi required at pre and post."""
    return _config()


@pytest.fixture
def site(tmp_path: Path, cfg: RectalFLConfig) -> Site:
    """A clean, valid site (3 patients x pre/post x t2w/dwi, images + masks, one second-rater mask)."""
    s = Site(tmp_path / "site", cfg)
    s.root.mkdir()
    s.write_csv()
    for k, pid in enumerate(PATIENTS):
        for tp in ("pre", "post"):
            for seq in GRIDS:
                s.write(make_volume(seq, seed=k), pid, tp, seq)
                s.write(make_mask(seq), pid, tp, seq, kind="mask")
    s.write(make_mask("t2w"), "P001", "pre", "t2w", kind="mask_rater2")
    return s


@pytest.fixture
def find_issue() -> Callable[..., Issue]:
    """``find_issue(report, code, severity=None, patient=None, file=None)``: the one matching issue.

    Asserts it exists and that its message names the patient and the file it is about.
    """

    def find(report: CheckReport, code: str, severity: str | None = None, patient: str | None = None,
             file: str | None = None) -> Issue:
        hits = [i for i in report.issues if i.code == code and (patient is None or i.patient_id == patient)
                and (file is None or i.file == file)]
        assert hits, f"no {code!r} issue for patient={patient} file={file}; got:\n" + "\n".join(
            f"  {i.severity} {i.code} {i.patient_id} {i.file}: {i.message}" for i in report.issues)
        issue = hits[0]
        if severity is not None:
            assert issue.severity == severity, issue
        if patient is not None:
            assert patient in issue.message, issue.message
        if file is not None:
            assert file in issue.message, issue.message
        return issue

    return find
