"""Reading and validating ``patients.csv`` (the table half of the site data contract).

One row per patient: ``patient_id``, a label (``trg`` 0-3 and/or ``response`` 0/1, response 1 =
good = TRG 0-1) and optional clinical-radiological columns (:data:`CLINICAL_COLUMNS`).

Everything public here is re-exported by :mod:`shared.cohort`; import from there.
"""

from __future__ import annotations

import csv
import difflib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from shared.cohort_types import CohortError, Issue
from shared.config import RectalFLConfig

logger = logging.getLogger(__name__)

PATIENTS_FILE = "patients.csv"
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
"""A patient id: letters, digits, ``_``, ``.``, ``-`` (it names a folder); not starting with ``.``."""

LABEL_COLUMNS: tuple[str, ...] = ("trg", "response")

NUMERIC_RANGES: dict[str, tuple[float, float, str]] = {
    "age": (18.0, 110.0, "years"),
    "hb": (0.0, 250.0, "g/L or g/dL, > 0"),
    "cea": (0.0, 1e5, "ng/mL, >= 0"),
    "ca19_9": (0.0, 1e5, "U/mL, >= 0"),
    "pre_ld": (0.0, 300.0, "mm"),
    "post_ld": (0.0, 300.0, "mm"),
    "pre_mwt": (0.0, 100.0, "mm"),
    "post_mwt": (0.0, 100.0, "mm"),
    "pre_dtav": (0.0, 300.0, "mm or cm, >= 0"),
    "post_dtav": (0.0, 300.0, "mm or cm, >= 0"),
    "rfs_months": (0.0, 600.0, "months"),
}
"""Numeric clinical columns: plausible [low, high] and unit hint (outside -> warning)."""

_MISSING = {"", "na", "n/a", "nan", "null", "none", "#n/a", "?", "unknown", "nk", "<na>"}
_YES = {"1", "1.0", "yes", "y", "true", "pos", "positive", "+"}
_NO = {"0", "0.0", "no", "n", "false", "neg", "negative", "-"}


def _binary(v: str) -> int | None:
    s = v.strip().lower()
    return 1 if s in _YES else 0 if s in _NO else None


def _sex(v: str) -> str | None:
    s = v.strip().lower()
    return {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F"}.get(s)


def _stage(prefix: str, allowed: str) -> Callable[[str], str | None]:
    pat = re.compile(rf"^{prefix}?([{allowed}x]|is)([a-d])?$", re.IGNORECASE)

    def parse(v: str) -> str | None:
        m = pat.match(v.strip().replace(" ", ""))
        if not m:
            return None
        core = m.group(1).upper() if m.group(1).lower() in ("x", "is") else m.group(1)
        core = "is" if core == "IS" else core
        return f"{prefix.upper()}{core}{(m.group(2) or '').lower()}"

    return parse


CATEGORICAL_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "sex": (_sex, "M/F (or male/female)"),
    "t_stage": (_stage("t", "0-4"), "T0-T4 with optional a-d suffix, or Tx (e.g. T3b, 3)"),
    "n_stage": (_stage("n", "0-2"), "N0-N2 with optional a-c suffix, or Nx (e.g. N1a, 1)"),
    "crm": (_binary, "0/1 (or negative/positive, no/yes)"),
    "emvi": (_binary, "0/1 (or negative/positive, no/yes)"),
    "recurrence": (_binary, "0/1 (or no/yes)"),
}
"""Categorical clinical columns: parser to a canonical value (None = unrecognised) and allowed values."""

CLINICAL_COLUMNS: tuple[str, ...] = (
    "age", "sex", "hb", "cea", "ca19_9", "pre_ld", "post_ld", "pre_mwt", "post_mwt", "pre_dtav",
    "post_dtav", "t_stage", "n_stage", "crm", "emvi", "rfs_months", "recurrence",
)
KNOWN_COLUMNS: tuple[str, ...] = ("patient_id", *LABEL_COLUMNS, *CLINICAL_COLUMNS)

_CSV_FIX = (
    "save patients.csv as comma-separated UTF-8 text with a header row (patient_id, trg and/or response, "
    "optional clinical columns) and the same number of fields on every line"
)


@dataclass
class PatientsTable:
    """The outcome of reading ``patients.csv``.

    Attributes
    ----------
    table : DataFrame or None
        One row per valid, distinct patient id (see :func:`read_patients_table`); None when the
        file is unusable.
    issues : list of Issue
    listed_ids : list of str
        Every distinct non-empty id in the file, valid or not, in file order.
    n_empty_ids : int
        Rows whose id is empty.
    fatal : Issue or None
        The error that makes the file unusable, if any.
    """

    table: pd.DataFrame | None
    issues: list[Issue] = field(default_factory=list)
    listed_ids: list[str] = field(default_factory=list)
    n_empty_ids: int = 0
    fatal: Issue | None = None

    @property
    def valid_ids(self) -> list[str]:
        """The ids of the returned table (valid and distinct)."""
        return [] if self.table is None else self.table["patient_id"].tolist()


def normalise_column(name: str) -> str:
    """``" CA19-9 "`` -> ``"ca19_9"``: strip, lower-case, spaces and hyphens to underscores."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def is_valid_patient_id(pid: str) -> bool:
    """Whether ``pid`` is usable as a patient id (and folder name)."""
    return bool(ID_PATTERN.match(pid)) and not pid.startswith(".")


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or str(v).strip().lower() in _MISSING


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _fatal(code: str, message: str, fix: str) -> Issue:
    return Issue("error", code, None, PATIENTS_FILE, message, fix)


def _read_csv(path: Path) -> tuple[pd.DataFrame | None, Issue | None]:
    """Read the raw table as strings; an Issue when it cannot be parsed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, _fatal("csv_unparseable", f"{PATIENTS_FILE}: cannot be read ({exc.strerror or exc})",
                            "check the file's permissions")
    if raw[:4] == b"PK\x03\x04" or raw[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        return None, _fatal("csv_unparseable", f"{PATIENTS_FILE}: is a spreadsheet (Excel) file, not CSV text",
                            "open it in the spreadsheet program and save as 'CSV UTF-8 (comma delimited)'")
    if not raw.strip():
        return None, _fatal("csv_empty", f"{PATIENTS_FILE}: the file is empty",
                            "write a header row and one row per patient")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="error", encoding="utf-8-sig",
                         skip_blank_lines=True)
    except UnicodeDecodeError as exc:
        return None, _fatal("csv_unparseable", f"{PATIENTS_FILE}: is not UTF-8 text ({exc.reason} at byte {exc.start})",
                            "re-save the file with UTF-8 encoding")
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return None, _fatal("csv_unparseable", f"{PATIENTS_FILE}: malformed CSV ({detail})",
                            "fix the line named above (a stray comma or an unquoted comma inside a value); " + _CSV_FIX)
    except pd.errors.EmptyDataError:
        return None, _fatal("csv_empty", f"{PATIENTS_FILE}: the file has no header row",
                            "write a header row and one row per patient")
    if df.shape[1] == 1:
        header = str(df.columns[0])
        for delim, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars")):
            if delim in header:
                return None, _fatal("csv_unparseable",
                                    f"{PATIENTS_FILE}: the header {header!r} is one field: the file seems delimited "
                                    f"by {name}, not commas",
                                    "re-save the file comma-separated (or replace the delimiter with commas)")
    return df.fillna(""), None


def read_patients_table(site_dir: str | Path, cfg: RectalFLConfig) -> PatientsTable:
    """Read and validate ``patients.csv`` without raising on bad content.

    Parameters
    ----------
    site_dir : str or Path
    cfg : RectalFLConfig
        ``cfg.data.label`` picks the outcome column (``response`` accepts ``trg`` as a fallback).

    Returns
    -------
    PatientsTable
        ``table`` holds one row per valid, distinct id, in file order: ``patient_id`` (str),
        ``trg`` (Int64, when the column exists), ``response`` (Int64, derived from ``trg`` when
        needed; <NA> for a patient with a label error or a duplicated id), the numeric clinical
        columns as float (unparseable values -> NaN), the categorical ones in canonical form
        (sex ``M``/``F``; stages ``T3b``, ``N1``; crm/emvi/recurrence Int64 0/1), any other column
        unchanged. Rows with an empty or invalid id are not in ``table``; each problem is an Issue.
    """
    site = Path(site_dir)
    path = site / PATIENTS_FILE
    if not path.is_file():
        others = sorted(p.name for p in site.glob("*") if p.suffix.lower() in (".csv", ".xlsx", ".xls", ".tsv"))
        hint = f" (found {', '.join(others)}: rename or convert the right one)" if others else ""
        issue = _fatal("csv_missing", f"{PATIENTS_FILE}: not found in {site}{hint}",
                       "create patients.csv with one row per patient: patient_id and trg and/or response")
        return PatientsTable(None, [issue], fatal=issue)
    raw, problem = _read_csv(path)
    if problem is not None or raw is None:
        return PatientsTable(None, [problem] if problem else [], fatal=problem)
    return _validate(raw, cfg)


def _validate(raw: pd.DataFrame, cfg: RectalFLConfig) -> PatientsTable:
    issues: list[Issue] = []
    original = [str(c) for c in raw.columns]
    cols = [normalise_column(c) for c in original]
    dup_cols = sorted({c for c in cols if cols.count(c) > 1})
    if dup_cols:
        issue = _fatal("csv_duplicate_column",
                       f"{PATIENTS_FILE}: column(s) {', '.join(dup_cols)} appear more than once "
                       f"(header: {', '.join(original)})",
                       "keep one column of each name")
        return PatientsTable(None, [issue], fatal=issue)
    raw = raw.copy()
    raw.columns = cols
    if "patient_id" not in cols:
        guess = [c for c in original if normalise_column(c) in ("id", "patient", "pid", "patientid", "subject",
                                                                "subject_id", "case", "case_id", "patient_no")]
        hint = f"; rename {guess[0]!r} to patient_id" if guess else ""
        issue = _fatal("csv_no_patient_id", f"{PATIENTS_FILE}: no patient_id column (columns: {', '.join(original)})",
                       f"add a patient_id column matching the folder names under images/{hint}")
        return PatientsTable(None, [issue], fatal=issue)
    label = cfg.data.label
    has = {c: c in cols for c in LABEL_COLUMNS}
    if (label == "trg" and not has["trg"]) or not any(has.values()):
        need = "a trg column (data.label is 'trg')" if label == "trg" else "a trg (0-3) or response (0/1) column"
        extra = "; the file has 'response': set data.label: response in the site config" if has["response"] else ""
        issue = _fatal("csv_no_label", f"{PATIENTS_FILE}: no label column: need {need} (columns: {', '.join(original)})",
                       f"add the outcome column{extra}")
        return PatientsTable(None, [issue], fatal=issue)
    if raw.empty:
        issue = _fatal("csv_empty", f"{PATIENTS_FILE}: has a header but no patient rows",
                       "add one row per patient")
        return PatientsTable(None, [issue], fatal=issue)

    unknown = [c for c in cols if c not in KNOWN_COLUMNS]
    if unknown:
        hints = []
        for c in unknown:
            close = difflib.get_close_matches(c, KNOWN_COLUMNS, n=1, cutoff=0.75)
            if close:
                hints.append(f"{c!r} -> {close[0]!r}?")
        issues.append(Issue(
            "warning", "csv_unknown_columns", None, PATIENTS_FILE,
            f"{PATIENTS_FILE}: {len(unknown)} column(s) not in the contract, kept but not used by the models: "
            f"{', '.join(unknown)}" + (f" (did you mean {'; '.join(hints)})" if hints else ""),
            "rename them to a contract column if that is what they are (see shared.cohort.KNOWN_COLUMNS), "
            "otherwise ignore this warning",
        ))

    # ---- ids
    ids = [str(v).strip() for v in raw["patient_id"]]
    lines = [i + 2 for i in range(len(raw))]  # header is line 1
    keep: list[int] = []
    seen: dict[str, list[int]] = {}
    listed: list[str] = []
    n_empty = 0
    for row, (pid, line) in enumerate(zip(ids, lines, strict=True)):
        if pid == "":
            n_empty += 1
            issues.append(Issue("error", "invalid_patient_id", None, PATIENTS_FILE,
                                f"{PATIENTS_FILE} line {line}: empty patient_id",
                                "fill in the patient id (as named under images/) or delete the line"))
            continue
        if pid not in seen:
            listed.append(pid)
        seen.setdefault(pid, []).append(line)
        if not is_valid_patient_id(pid):
            if len(seen[pid]) == 1:
                issues.append(Issue("error", "invalid_patient_id", pid, PATIENTS_FILE,
                                    f"{PATIENTS_FILE} line {line} (patient {pid!r}): invalid patient_id: only letters, "
                                    "digits, '_', '.' and '-' are allowed, not starting with '.'",
                                    "rename the patient (in patients.csv and its folders under images/ and masks/)"))
            continue
        if len(seen[pid]) == 1:
            keep.append(row)
    duplicated = {pid: ls for pid, ls in seen.items() if len(ls) > 1}
    for pid, ls in duplicated.items():
        issues.append(Issue("error", "duplicate_patient_id", pid, PATIENTS_FILE,
                            f"{PATIENTS_FILE}: patient {pid} appears {len(ls)} times (lines "
                            f"{', '.join(map(str, ls))}); the patient is excluded until resolved",
                            "keep one row per patient (merge or delete the duplicates)"))

    table = raw.iloc[keep].copy()
    table["patient_id"] = [ids[r] for r in keep]
    row_line = {ids[r]: lines[r] for r in keep}

    # ---- labels
    bad_label: set[str] = set(duplicated)
    parsed: dict[str, list[int | None]] = {}
    ranges = {"trg": (0, 3), "response": (0, 1)}
    for col in LABEL_COLUMNS:
        if not has[col]:
            continue
        lo, hi = ranges[col]
        values: list[int | None] = []
        for pid, v in zip(table["patient_id"], table[col], strict=True):
            value, why = _parse_label(v, lo, hi)
            if why:
                bad_label.add(pid)
                issues.append(Issue("error", "label_invalid", pid, PATIENTS_FILE,
                                    f"{PATIENTS_FILE} line {row_line[pid]} (patient {pid}): {col} = {str(v).strip()!r} "
                                    f"{why}",
                                    f"set {col} to an integer in {lo}-{hi} "
                                    + ("(TRG 0-1 = good response)" if col == "trg" else "(1 = good, i.e. TRG 0-1)")
                                    + ", or leave it empty if unknown"))
            values.append(value)
        parsed[col] = values
    response: list[int | None] = []
    for k, pid in enumerate(table["patient_id"]):
        trg = parsed.get("trg", [None] * len(table))[k]
        resp = parsed.get("response", [None] * len(table))[k]
        derived = None if trg is None else int(trg <= 1)
        if pid in bad_label:
            response.append(None)
            continue
        if trg is not None and resp is not None and derived != resp:
            bad_label.add(pid)
            issues.append(Issue("error", "label_inconsistent", pid, PATIENTS_FILE,
                                f"{PATIENTS_FILE} line {row_line[pid]} (patient {pid}): trg = {trg} means response = "
                                f"{derived} (good = TRG 0-1) but response = {resp}",
                                "correct trg or response (response 1 exactly when trg is 0 or 1)"))
            response.append(None)
            continue
        value = derived if label == "trg" else (resp if resp is not None else derived)
        if value is None:
            bad_label.add(pid)
            need = "trg" if label == "trg" else " or ".join(c for c in LABEL_COLUMNS if has[c])
            issues.append(Issue("error", "label_missing", pid, PATIENTS_FILE,
                                f"{PATIENTS_FILE} line {row_line[pid]} (patient {pid}): no label ({need} is empty)",
                                f"fill in {need}, or remove the patient if the outcome is unknown"))
        response.append(value)
    if has["trg"]:
        table["trg"] = pd.array(parsed["trg"], dtype="Int64")
    table["response"] = pd.array(response, dtype="Int64")

    # ---- clinical columns
    for col in CLINICAL_COLUMNS:
        if col not in table.columns:
            continue
        issues.extend(_check_clinical(table, col))
    return PatientsTable(table.reset_index(drop=True), issues, listed, n_empty)


def _parse_label(v: Any, lo: int, hi: int) -> tuple[int | None, str | None]:
    if _is_missing(v):
        return None, None
    s = str(v).strip()
    try:
        f = float(s)
    except ValueError:
        return None, "is not a number"
    if f != f or f != int(f):
        return None, "is not a whole number"
    if not lo <= int(f) <= hi:
        return None, f"is outside {lo}-{hi}"
    return int(f), None


def _check_clinical(table: pd.DataFrame, col: str) -> list[Issue]:
    """Canonicalise one clinical column in place; summarise its missing/invalid/implausible values."""
    issues: list[Issue] = []
    pids = table["patient_id"].tolist()
    values = table[col].tolist()
    missing = [p for p, v in zip(pids, values, strict=True) if _is_missing(v)]
    invalid: list[str] = []
    implausible: list[str] = []
    if col in NUMERIC_RANGES:
        lo, hi, unit = NUMERIC_RANGES[col]
        out: list[float] = []
        for p, v in zip(pids, values, strict=True):
            if _is_missing(v):
                out.append(float("nan"))
                continue
            try:
                f = float(str(v).strip())
            except ValueError:
                invalid.append(f"{p}={str(v).strip()!r}")
                out.append(float("nan"))
                continue
            if f != f or not lo <= f <= hi:
                implausible.append(f"{p}={f:g}")
            out.append(f)
        table[col] = pd.array(out, dtype="float64")
        allowed = f"a number in {lo:g}-{hi:g} ({unit})"
    else:
        parse, allowed = CATEGORICAL_PARSERS[col]
        canon: list[Any] = []
        for p, v in zip(pids, values, strict=True):
            if _is_missing(v):
                canon.append(None)
                continue
            c = parse(str(v))
            if c is None:
                invalid.append(f"{p}={str(v).strip()!r}")
            canon.append(c)
        is_int = col in ("crm", "emvi", "recurrence")
        table[col] = pd.array(canon, dtype="Int64") if is_int else pd.array(canon, dtype="string")
    n = len(pids)
    if missing:
        issues.append(Issue(
            "warning", "clinical_missing", None, PATIENTS_FILE,
            f"{PATIENTS_FILE}: column {col}: {len(missing)} of {n} patients have no value "
            f"(patients {_preview(missing)})",
            "fill in the values if available; missing values are allowed (imputed or left out by the clinical model)",
        ))
    if invalid:
        issues.append(Issue(
            "warning", "clinical_invalid", None, PATIENTS_FILE,
            f"{PATIENTS_FILE}: column {col}: {len(invalid)} value(s) not of the expected type, treated as missing "
            f"({_preview(invalid)})",
            f"use {allowed}",
        ))
    if implausible:
        issues.append(Issue(
            "warning", "clinical_implausible", None, PATIENTS_FILE,
            f"{PATIENTS_FILE}: column {col}: {len(implausible)} implausible value(s), kept as given "
            f"({_preview(implausible)})",
            f"check the values and units; expected {allowed}",
        ))
    return issues


def load_patients(site_dir: str | Path, cfg: RectalFLConfig) -> pd.DataFrame:
    """Read the validated patient table of a site.

    Parameters
    ----------
    site_dir : str or Path
    cfg : RectalFLConfig

    Returns
    -------
    DataFrame
        One row per valid, distinct ``patient_id`` (str column, unique, in file order), with a
        ``response`` column (Int64 0/1; derived from ``trg`` when only ``trg`` is given or
        ``data.label`` is ``trg``; <NA> for a patient with a label error or a duplicated id) and
        the other columns as described in :func:`read_patients_table`. Row-level problems are
        logged as warnings; :func:`shared.cohort.check_site` reports each one.

    Raises
    ------
    CohortError
        When the site folder or ``patients.csv`` is missing, or the file is not parseable CSV,
        has no ``patient_id`` column, no label column, no rows, or duplicated column names.
    """
    site = Path(site_dir)
    if not site.is_dir():
        raise CohortError(f"{site}: site folder not found (it should hold patients.csv, images/ and masks/)")
    result = read_patients_table(site, cfg)
    if result.fatal is not None or result.table is None:
        issue = result.fatal
        msg = issue.message if issue else f"{PATIENTS_FILE}: unusable"
        raise CohortError(f"{site / PATIENTS_FILE}: {msg.removeprefix(PATIENTS_FILE + ': ')}; "
                          f"{issue.fix if issue else _CSV_FIX}")
    n_rows = [i for i in result.issues if i.severity == "error"]
    if n_rows:
        logger.warning("%s: %d row problem(s) (run `rectalfl site check` for details): %s",
                       site / PATIENTS_FILE, len(n_rows), "; ".join(i.message for i in n_rows[:5]))
    return result.table
