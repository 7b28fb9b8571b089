"""`rectalfl report` on damaged run directories: a warning for each missing or unreadable optional input,
a non-zero exit naming the file for a malformed or truncated one (issue 13)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rectalfl import app
from server.report import ReportError, build_report

runner = CliRunner()


def flat(text: str) -> str:
    return "".join(text.split())


def test_every_missing_optional_table_is_named_on_the_terminal(run_copy):
    # Prepare: three optional tables and the curve data gone
    gone = ["delong", "calibration", "per_site"]
    for name in gone:
        (run_copy / "tables" / f"{name}.csv").unlink()
    (run_copy / "report_data" / "curves.json").unlink()
    # Execute
    res = runner.invoke(app, ["report", str(run_copy)])
    # Assert: the report is still built, and each missing input has its own warning line
    assert res.exit_code == 0, res.output
    assert (run_copy / "report.html").is_file()
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    text = flat(res.output)
    for name in gone:
        assert f"tables/{name}.csvnotfound" in text
    assert "report_data/curves.jsonnotfound" in text
    assert len(warnings) >= len(gone) + 1


def test_an_empty_optional_table_is_a_warning_not_an_error(run_copy):
    (run_copy / "tables" / "shap_importance.csv").write_bytes(b"")
    res = runner.invoke(app, ["report", str(run_copy)])
    assert res.exit_code == 0, res.output
    assert "tables/shap_importance.csvisempty" in flat(res.output)


def test_a_complete_run_directory_gives_no_warning(run_copy):
    (run_copy / "tables" / "signature_auc.csv").write_text(
        "backbone,site,split,n_pos,n_neg,auc,lo,hi,bound,note\npre_t2w,site_a,test,4,6,0.7,0.4,0.9,0.01,\n")
    res = runner.invoke(app, ["report", str(run_copy)])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output


def test_table3_cut_mid_row_fails_naming_the_file(run_copy):
    # Prepare: Table 3 cut in the middle of its third data row, as an interrupted copy leaves it
    p = run_copy / "tables" / "table3_performance.csv"
    text = p.read_text()
    lines = text.splitlines(keepends=True)
    cut = "".join(lines[:3]) + lines[3][: len(lines[3]) // 2]
    p.write_text(cut)
    # Execute
    res = runner.invoke(app, ["report", str(run_copy)])
    # Assert
    assert res.exit_code != 0
    assert "table3_performance.csv" in flat(res.output) and "truncated" in res.output
    assert not (run_copy / "report.html").exists()


def test_a_row_cut_at_a_field_boundary_is_still_truncated(run_copy):
    p = run_copy / "tables" / "calibration.csv"
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:-1]) + ",".join(lines[-1].split(",")[:2]))  # last row: 2 fields, no line end
    with pytest.raises(ReportError, match=r"calibration\.csv: truncated"):
        build_report(run_copy)


def test_garbage_in_an_optional_table_fails(run_copy):
    (run_copy / "tables" / "delong.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    res = runner.invoke(app, ["report", str(run_copy)])
    assert res.exit_code != 0
    assert "delong.csv" in flat(res.output) and "malformed" in res.output


def test_ragged_rows_and_missing_columns_are_malformed(run_copy):
    p = run_copy / "tables" / "per_site.csv"
    lines = p.read_text().splitlines(keepends=True)
    lines.insert(2, "only,three,fields\n")
    p.write_text("".join(lines))
    with pytest.raises(ReportError, match=r"per_site\.csv: malformed: line 3 has 3 field"):
        build_report(run_copy)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match=r"per_site\.csv: malformed: no column\(s\) model, site"):
        build_report(run_copy)


def test_truncated_curve_data_fails(run_copy):
    p = run_copy / "report_data" / "curves.json"
    p.write_text(p.read_text()[:200])
    res = runner.invoke(app, ["report", str(run_copy)])
    assert res.exit_code != 0
    assert "curves.json" in flat(res.output) and "truncated" in res.output
