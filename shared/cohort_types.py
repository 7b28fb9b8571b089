"""Data types of the site data contract: the error, an issue, the check report, a volume record.

Everything here is re-exported by :mod:`shared.cohort`; import from there.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

logger = logging.getLogger(__name__)

Severity = Literal["error", "warning"]

ISSUE_COLUMNS: tuple[str, ...] = ("severity", "code", "patient_id", "file", "message", "fix")


class CohortError(ValueError):
    """A site folder or one of its files cannot be used at all.

    The message names the file (or folder) and says what to do about it.
    """


@dataclass
class Issue:
    """One problem found in a site's data.

    Attributes
    ----------
    severity : {"error", "warning"}
        An error excludes the patient (or, without a patient, makes the site unusable);
        a warning is reported and the data are still used.
    code : str
        Short stable slug, e.g. ``"missing_image"`` or ``"geometry_mismatch"``.
    patient_id : str or None
        The patient concerned, or None for a site-level problem.
    file : str or None
        Path relative to the site folder (POSIX separators), or None.
    message : str
        What is wrong, naming the patient and the file.
    fix : str
        A suggested action.
    """

    severity: Severity
    code: str
    patient_id: str | None
    file: str | None
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        """Return the issue as a JSON-able dict."""
        return asdict(self)


ExclusionScope = Literal["patient", "volume"]

EXCLUSION_COLUMNS: tuple[str, ...] = ("patient_id", "timepoint", "sequence", "scope", "rule", "code", "file",
                                      "reason")


@dataclass(frozen=True)
class Exclusion:
    """One recorded decision to leave data out (the one exclusion rule, see ``docs/site.md``).

    Attributes
    ----------
    patient_id : str
    timepoint, sequence : str or None
        The volume removed; None when the whole patient is (``scope == "patient"``).
    scope : {"patient", "volume"}
        What is removed.
    rule : {"patient", "volume"}
        The ``check.exclusion`` setting that applied.
    code : str
        The issue code (or preprocessing status) that triggered it, e.g. ``"nonfinite_voxels"``.
    file : str or None
        The file at fault, relative to the site folder.
    reason : str
        The issue's message.
    """

    patient_id: str
    timepoint: str | None
    sequence: str | None
    scope: ExclusionScope
    rule: str
    code: str
    file: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckReport:
    """The result of :func:`shared.cohort.check_site`.

    Attributes
    ----------
    site_dir : Path
        The folder that was checked.
    n_patients : int
        Patients listed in ``patients.csv`` (distinct ids; a row with an empty id counts as one).
    n_usable_patients : int
        Listed patients without any error.
    issues : list of Issue
        Every problem found, in the order found.
    volumes_checked : int
        Image and mask files (or DICOM folders) that were opened.
    """

    site_dir: Path
    n_patients: int
    n_usable_patients: int
    issues: list[Issue] = field(default_factory=list)
    volumes_checked: int = 0
    rule: str = "patient"
    """``check.exclusion``: what an error removes (``patient`` or ``volume``)."""
    exclusions: list[Exclusion] = field(default_factory=list)
    """What the errors remove under ``rule`` (one entry per patient or volume and issue)."""

    @property
    def errors(self) -> list[Issue]:
        """The issues of severity ``"error"``."""
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        """The issues of severity ``"warning"``."""
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings are allowed)."""
        return not self.errors

    @property
    def excluded_patients(self) -> set[str]:
        """Ids of the patients left out entirely: the recorded decision (every patient with an error
        under the ``patient`` rule; under ``volume``, those whose error is not about one volume)."""
        return {e.patient_id for e in self.exclusions if e.scope == "patient"}

    @property
    def excluded_volumes(self) -> set[tuple[str, str, str]]:
        """``(patient_id, timepoint, sequence)`` of volumes left out on their own (``volume`` rule)."""
        return {(e.patient_id, str(e.timepoint), str(e.sequence)) for e in self.exclusions if e.scope == "volume"}

    def codes(self, severity: Severity | None = None) -> list[str]:
        """Return the issue codes (optionally of one severity), in the order found."""
        return [i.code for i in self.issues if severity is None or i.severity == severity]

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-able dict (counts, excluded ids, every issue)."""
        by_code: dict[str, int] = {}
        for i in self.issues:
            by_code[i.code] = by_code.get(i.code, 0) + 1
        return {
            "site_dir": str(self.site_dir),
            "ok": self.ok,
            "n_patients": int(self.n_patients),
            "n_usable_patients": int(self.n_usable_patients),
            "volumes_checked": int(self.volumes_checked),
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "issue_counts": dict(sorted(by_code.items())),
            "exclusion_rule": self.rule,
            "excluded_patients": sorted(self.excluded_patients),
            "excluded_volumes": [list(v) for v in sorted(self.excluded_volumes)],
            "exclusions": [e.to_dict() for e in self.exclusions],
            "issues": [i.to_dict() for i in self.issues],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckReport:
        """Inverse of :meth:`to_dict`."""
        return cls(Path(d["site_dir"]), int(d["n_patients"]), int(d["n_usable_patients"]),
                   [Issue(**i) for i in d.get("issues", [])], int(d.get("volumes_checked", 0)),
                   str(d.get("exclusion_rule", "patient")), [Exclusion(**e) for e in d.get("exclusions", [])])

    def exclusions_table(self) -> pd.DataFrame:
        """The exclusions as a DataFrame (:data:`EXCLUSION_COLUMNS`)."""
        return pd.DataFrame([e.to_dict() for e in self.exclusions], columns=list(EXCLUSION_COLUMNS))

    def to_table(self) -> pd.DataFrame:
        """Return the issues as a DataFrame with columns severity, code, patient_id, file, message, fix."""
        return pd.DataFrame([i.to_dict() for i in self.issues], columns=list(ISSUE_COLUMNS))


@dataclass(frozen=True)
class VolumeRecord:
    """One volume preprocessing will consume.

    Attributes
    ----------
    patient_id : str
    timepoint : str
        ``"pre"`` or ``"post"``.
    sequence : str
        ``"t2w"``, ``"dwi"``, ``"ce_t1w"`` or ``"adc"``.
    image_path : Path
        The image file or DICOM series folder (as :func:`shared.cohort.find_volume` resolves it).
    mask_path : Path or None
        The volume's own reference mask, or None (see :func:`shared.cohort.find_fallback_mask`).
    mask2_path : Path or None
        The second rater's mask, or None.
    """

    patient_id: str
    timepoint: str
    sequence: str
    image_path: Path
    mask_path: Path | None
    mask2_path: Path | None
