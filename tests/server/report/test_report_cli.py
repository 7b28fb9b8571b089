"""`rectalfl report RUN_DIR [--open/--no-open]` through typer's runner: rebuilds the report, clear errors."""

from __future__ import annotations

import shutil
import webbrowser

from typer.testing import CliRunner

from rectalfl import app

runner = CliRunner()


def flat(text: str) -> str:
    """The output without whitespace: rich wraps long lines anywhere, even inside a file name."""
    return "".join(text.split())


def test_report_command_rebuilds_figures_and_html(built_run, tmp_path, monkeypatch):
    rd = tmp_path / "run"
    shutil.copytree(built_run[0], rd)
    (rd / "report.html").unlink()
    (rd / "figures" / "per_site_auc.png").unlink()
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    res = runner.invoke(app, ["report", str(rd), "--open"])
    assert res.exit_code == 0, res.output
    html = rd / "report.html"
    assert html.is_file() and "report.html" in flat(res.output)
    assert (rd / "figures" / "per_site_auc.png").is_file()
    assert opened == [html.resolve().as_uri()]


def test_report_command_does_not_open_by_default(tmp_path, monkeypatch):
    import server.report

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    monkeypatch.setattr(server.report, "build_report", lambda rd, **kw: rd / "report.html")
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "report.html") in flat(res.output) and opened == []


def test_report_command_on_a_non_run_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run", encoding="utf-8")
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "notarundirectory" in flat(res.output)
    assert not (tmp_path / "report.html").exists()
    res = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nosuchdirectory" in flat(res.output)


def test_report_command_names_the_missing_table(run_copy):
    (run_copy / "tables" / "table3_performance.csv").unlink()
    res = runner.invoke(app, ["report", str(run_copy)])
    assert res.exit_code == 2
    assert "table3_performance.csvnotfound" in flat(res.output) and "--resume" in res.output
