"""A clean site passes; the report's shape, counters, progress and serialisation."""

from __future__ import annotations

import json

import pytest

from shared.cohort import CohortError, check_site


def test_clean_site_passes_without_errors_or_warnings(site) -> None:
    # Prepare: the fixture's valid site (3 patients, t2w+dwi, pre+post, masks)
    # Execute
    report = site.check()
    # Assert
    assert report.ok, report.to_table().to_string()
    assert report.issues == []
    assert report.n_patients == 3 and report.n_usable_patients == 3
    assert report.excluded_patients == set()
    assert report.volumes_checked == 3 * 2 * 2 * 2 + 1  # images + own masks + one second-rater mask


def test_report_serialises_to_json_and_table(site) -> None:
    # Prepare: one warning-level problem
    (site.root / "patients.csv").write_text("patient_id,trg,response,colour\nP001,0,1,red\nP002,2,0,blue\n"
                                           "P003,3,0,red\n")
    # Execute
    report = site.check()
    blob = json.loads(json.dumps(report.to_dict()))
    table = report.to_table()
    # Assert
    assert blob["ok"] is True and blob["n_warnings"] == 1 and blob["issue_counts"] == {"csv_unknown_columns": 1}
    assert list(table.columns) == ["severity", "code", "patient_id", "file", "message", "fix"]
    assert table.loc[0, "code"] == "csv_unknown_columns"


def test_progress_reports_every_volume_unit(site) -> None:
    # Prepare
    calls: list[tuple[int, int, str]] = []
    # Execute
    site.check(progress=lambda done, total, label: calls.append((done, total, label)))
    # Assert: 3 patients x 2 timepoints x 2 sequences, ending at done == total
    assert calls[0][:2] == (0, 12)
    assert calls[-1][:2] == (12, 12)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_missing_site_dir_is_the_only_raise(tmp_path, cfg) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(CohortError, match="site folder not found"):
        check_site(tmp_path / "nope", cfg)


def test_empty_site_dir_reports_instead_of_raising(tmp_path, cfg) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()
    # Execute
    report = check_site(tmp_path / "empty", cfg)
    # Assert
    assert not report.ok
    assert {"csv_missing", "images_folder_missing"} <= set(report.codes("error"))
