"""server.report / `rectalfl report`: figures, a self-contained HTML with every table's columns, clear errors."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rectalfl import app
from server.report import ReportError, build_report

PNG = b"\x89PNG\r\n\x1a\n"


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.th: list[str] = []
        self.h: list[str] = []
        self.imgs: list[str] = []
        self.refs: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("src", "href"):
            if a.get(k):
                self.refs.append(a[k])
        self._in = tag

    def handle_data(self, data):
        if self._in == "th":
            self.th.append(data.strip())
        elif self._in in ("h2", "h4"):
            self.h.append(data.strip())

    def handle_endtag(self, tag):
        self._in = None


@pytest.fixture(scope="module")
def run_dir(result, tmp_path_factory) -> Path:
    tmp, _, _ = result
    rd = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tmp / "run", rd)
    return rd


def parse(path: Path) -> Collect:
    c = Collect()
    c.feed(path.read_text(encoding="utf-8"))
    return c


def test_report_has_every_table_and_figure(run_dir):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    for name in ("roc_training", "roc_internal_test", "roc_external", "calibration_external", "decision_internal_test",
                 "signatures_training", "shap_FDL", "shap_CRD", "per_site_auc"):
        png = run_dir / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name
    doc = parse(path)
    for header in ("Good response", "Poor response",  # table 1
                   "OR", "adjusted OR", "selected",  # table 2
                   "AUC", "95% CI low", "95% CI high", "Accuracy", "Sensitivity", "Specificity", "F1",  # table 3
                   "Brier", "ECE", "Slope", "Intercept",  # calibration
                   "CV AUC", "Platt A", "Site", "Role", "Quantity", "Reason"):
        assert header in doc.th, header
    for section in ("Table 1. Baseline characteristics by response", "Table 3. Model performance per cohort",
                    "DeLong tests between models", "Per-site view", "Disclosure control"):
        assert section in doc.h, section
    assert {"FDL", "CR", "CRD"} <= set(doc.th)  # the DeLong matrix names the models
    assert len(doc.imgs) >= 9 and all(s.startswith("data:image/png;base64,") for s in doc.imgs)
    assert not [r for r in doc.refs if re.match(r"^(https?:)?//", r)], "the report must open offline"


def test_missing_optional_input_says_not_available(run_dir, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    (rd / "tables" / "table2_odds_ratios.csv").unlink()
    (rd / "tables" / "shap_importance.csv").unlink()
    text = build_report(rd).read_text(encoding="utf-8")
    t2 = text.split("Table 2.")[1].split("<h2>")[0]
    assert "not available" in t2 and "<table>" not in t2
    shap = text.split("Global SHAP importance")[1].split("<h2>")[0]
    assert "not available" in shap


def test_missing_performance_table_is_a_clear_error(run_dir, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    (rd / "tables" / "table3_performance.csv").unlink()
    with pytest.raises(ReportError, match="table3_performance.csv"):
        build_report(rd)


def test_cli_report(run_dir, tmp_path):
    runner = CliRunner()
    (run_dir / "report.html").unlink(missing_ok=True)
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert (run_dir / "report.html").is_file() and "report.html" in res.output
    bad = runner.invoke(app, ["report", str(tmp_path)])
    # the console wraps at its width, which depends on the path's length (longer under pytest-xdist)
    assert bad.exit_code == 2 and "not a run directory" in " ".join(bad.output.split())
