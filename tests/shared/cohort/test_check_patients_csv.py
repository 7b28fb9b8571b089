"""patients.csv problems: each is reported with its code, patient and file, and nothing crashes."""

from __future__ import annotations

import pandas as pd
import pytest

from shared.cohort import CohortError, load_patients

HEADER = "patient_id,trg,response,age,sex,cea,t_stage"


def test_malformed_csv_ragged_row(site, find_issue) -> None:
    # Prepare: line 3 has one field too many
    site.write_csv(rows=["P001,0,1,61,M,3.2,T3", "P002,2,0,55,F,1.0,T3b,extra", "P003,3,0,70,M,8.5,T4a"])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "csv_unparseable", "error", file="patients.csv")
    assert "line 3" in issue.message
    assert not report.ok
    with pytest.raises(CohortError, match="patients.csv"):
        load_patients(site.root, site.cfg)


def test_wrong_delimiter_is_named(site, find_issue) -> None:
    # Prepare
    (site.root / "patients.csv").write_text("patient_id;trg;response\nP001;0;1\nP002;2;0\nP003;3;0\n")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "csv_unparseable", "error", file="patients.csv")
    assert "semicolons" in issue.message


def test_missing_patients_csv(site, find_issue) -> None:
    # Prepare
    (site.root / "patients.csv").unlink()
    # Execute
    report = site.check()
    # Assert: the file is named, the volumes are still checked
    find_issue(report, "csv_missing", "error", file="patients.csv")
    assert report.volumes_checked == 25
    assert report.n_usable_patients == 0


def test_missing_patient_id_column(site, find_issue) -> None:
    # Prepare
    site.write_csv(header="id,trg,response,age,sex,cea,t_stage")
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "csv_no_patient_id", "error", file="patients.csv")
    assert "rename 'id' to patient_id" in issue.fix
    with pytest.raises(CohortError, match="no patient_id column"):
        load_patients(site.root, site.cfg)


def test_no_label_column(site, find_issue) -> None:
    # Prepare
    site.write_csv(header="patient_id,outcome", rows=["P001,1", "P002,0", "P003,0"])
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "csv_no_label", "error", file="patients.csv")
    with pytest.raises(CohortError, match="no label column"):
        load_patients(site.root, site.cfg)


def test_duplicate_patient_id(site, find_issue) -> None:
    # Prepare
    site.write_csv(rows=["P001,0,1,61,M,3.2,T3", "P002,2,0,55,F,1.0,T3b", "P003,3,0,70,M,8.5,T4a",
                         "P002,2,0,55,F,1.0,T3b"])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "duplicate_patient_id", "error", patient="P002", file="patients.csv")
    assert "lines 3, 5" in issue.message
    assert report.excluded_patients == {"P002"}
    assert report.n_patients == 3 and report.n_usable_patients == 2
    table = load_patients(site.root, site.cfg)
    assert table["patient_id"].is_unique
    assert table.set_index("patient_id").loc["P002", "response"] is pd.NA


@pytest.mark.parametrize("bad_id", ["P 004", "P/004", ".hidden"])
def test_invalid_patient_id(site, find_issue, bad_id) -> None:
    # Prepare
    site.write_csv(rows=[*["P001,0,1,61,M,3.2,T3", "P002,2,0,55,F,1.0,T3b", "P003,3,0,70,M,8.5,T4a"],
                         f"{bad_id},1,1,50,F,2,T2"])
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "invalid_patient_id", "error", patient=bad_id, file="patients.csv")
    assert bad_id not in load_patients(site.root, site.cfg)["patient_id"].tolist()


def test_empty_patient_id(site, find_issue) -> None:
    # Prepare
    site.write_csv(rows=["P001,0,1,61,M,3.2,T3", ",2,0,55,F,1.0,T3b", "P002,2,0,55,F,1.0,T3b",
                         "P003,3,0,70,M,8.5,T4a"])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "invalid_patient_id", "error", file="patients.csv")
    assert "line 3" in issue.message and issue.patient_id is None
    assert report.n_patients == 4 and report.n_usable_patients == 3


@pytest.mark.parametrize(("row", "needle"), [
    ("P002,5,0,55,F,1.0,T3b", "trg = '5' is outside 0-3"),
    ("P002,2,2,55,F,1.0,T3b", "response = '2' is outside 0-1"),
    ("P002,abc,0,55,F,1.0,T3b", "trg = 'abc' is not a number"),
    ("P002,1.5,0,55,F,1.0,T3b", "not a whole number"),
], ids=["trg-5", "response-2", "trg-text", "trg-fraction"])
def test_label_out_of_range_or_not_numeric(site, find_issue, row, needle) -> None:
    # Prepare
    site.write_csv(rows=["P001,0,1,61,M,3.2,T3", row, "P003,3,0,70,M,8.5,T4a"])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "label_invalid", "error", patient="P002", file="patients.csv")
    assert needle in issue.message
    assert report.excluded_patients == {"P002"}


def test_inconsistent_trg_and_response(site, find_issue) -> None:
    # Prepare: TRG 3 is a poor response, but response says good
    site.write_csv(rows=["P001,0,1,61,M,3.2,T3", "P002,2,0,55,F,1.0,T3b", "P003,3,1,70,M,8.5,T4a"])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "label_inconsistent", "error", patient="P003", file="patients.csv")
    assert "trg = 3" in issue.message and "response = 1" in issue.message


def test_missing_label_value(site, find_issue) -> None:
    # Prepare
    site.write_csv(rows=["P001,0,1,61,M,3.2,T3", "P002,,,55,F,1.0,T3b", "P003,3,0,70,M,8.5,T4a"])
    # Execute
    report = site.check()
    # Assert
    find_issue(report, "label_missing", "error", patient="P002", file="patients.csv")


def test_clinical_columns_wrong_type_implausible_and_missing_are_summarised(site, find_issue) -> None:
    # Prepare: age 'abc' (type), age 7 (implausible), negative CEA, two missing CEA values
    site.write_csv(rows=["P001,0,1,abc,M,,T3", "P002,2,0,7,F,-1,T3b", "P003,3,0,70,M,NA,T9"])
    # Execute
    report = site.check()
    # Assert: warnings only, one per column and kind, naming the patients
    assert report.ok
    assert "P001='abc'" in find_issue(report, "clinical_invalid", "warning", file="patients.csv").message
    implausible = [i.message for i in report.issues if i.code == "clinical_implausible"]
    assert any("age" in m and "P002=7" in m for m in implausible)
    assert any("cea" in m and "P002=-1" in m for m in implausible)
    missing = [i for i in report.issues if i.code == "clinical_missing"]
    assert len(missing) == 1 and "2 of 3" in missing[0].message and "P001, P003" in missing[0].message
    assert any("t_stage" in i.message and "P003='T9'" in i.message for i in report.issues
               if i.code == "clinical_invalid")


def test_unknown_columns_one_warning(site, find_issue) -> None:
    # Prepare
    site.write_csv(header=HEADER + ",ca199,scanner", rows=["P001,0,1,61,M,3.2,T3,1,a", "P002,2,0,55,F,1.0,T3b,2,b",
                                                           "P003,3,0,70,M,8.5,T4a,3,c"])
    # Execute
    report = site.check()
    # Assert
    issue = find_issue(report, "csv_unknown_columns", "warning", file="patients.csv")
    assert "ca199" in issue.message and "scanner" in issue.message and "'ca19_9'" in issue.message
    assert report.codes() == ["csv_unknown_columns"]


def test_excel_file_named_csv(site, find_issue) -> None:
    # Prepare
    (site.root / "patients.csv").write_bytes(b"PK\x03\x04" + bytes(100))
    # Execute
    report = site.check()
    # Assert
    assert "Excel" in find_issue(report, "csv_unparseable", "error", file="patients.csv").message
