"""server.report on a hand-written run directory: figures, a self-contained HTML with every table, the
disclosure log, 'not available' for missing optional inputs and a clear error for a missing Table 3."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from server.report import ReportError, build_report, fmt, render_figures
from tests.server.report.conftest import COHORTS, MODELS, SUPPRESSIONS

PNG = b"\x89PNG\r\n\x1a\n"
EXPECTED_FIGURES = {*(f"{k}_{c}" for k in ("roc", "calibration", "decision", "signatures") for c in COHORTS),
                    *(f"shap_{m}" for m in MODELS), "per_site_auc"}


class Page(HTMLParser):
    """Sections (h2 text -> their text), tables (headers, rows of cell texts, row classes), images, links."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.tables: list[dict] = []
        self.imgs: list[str] = []
        self.refs: list[str] = []
        self.tags: list[str] = []
        self._section: str | None = None
        self._h2: list[str] | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._head = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k in ("src", "href"):
            if a.get(k):
                self.refs.append(a[k])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "h2":
            self._h2 = []
        elif tag == "table":
            self.tables.append({"section": self._section, "headers": [], "rows": [], "classes": []})
        elif tag == "thead":
            self._head = True
        elif tag == "tr" and self.tables:
            self._row = []
            if not self._head:
                self.tables[-1]["classes"].append(a.get("class") or "")
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "h2" and self._h2 is not None:
            self._section = "".join(self._h2).strip()
            self.sections[self._section] = ""
            self._h2 = None
        elif tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell).strip()
            if self._row is not None:
                self._row.append(text)
            if tag == "th" and self.tables and self._head:
                self.tables[-1]["headers"].append(text)
            self._cell = None
        elif tag == "thead":
            self._head = False
        elif tag == "tr" and self._row is not None and self.tables:
            if not self._head:
                self.tables[-1]["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._h2 is not None:
            self._h2.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._section is not None:
            self.sections[self._section] += data


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def section(page: Page, start: str) -> str:
    return next(v for k, v in page.sections.items() if k.startswith(start))


def tables_in(page: Page, start: str) -> list[dict]:
    return [t for t in page.tables if (t["section"] or "").startswith(start)]


def test_build_report_writes_html_and_every_figure(built_run):
    rd, path = built_run
    assert path == rd / "report.html" and path.stat().st_size > 50_000
    stems = {p.stem for p in (rd / "figures").glob("*.png")}
    assert stems == EXPECTED_FIGURES
    for stem in EXPECTED_FIGURES:
        data = (rd / "figures" / f"{stem}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 5000, stem


def test_render_figures_alone_returns_what_it_wrote(run_copy):
    paths = render_figures(run_copy)
    assert {p.stem for p in paths} == EXPECTED_FIGURES
    assert all(p.parent == run_copy / "figures" and p.read_bytes()[:8] == PNG for p in paths)
    assert not (run_copy / "report.html").exists()


def test_every_table_has_its_columns(built_run):
    page = parse(built_run[1])
    required = {
        "Table 1": {"Variable", "Level", "Good response", "Poor response", "p", "Test", "Note"},
        "Table 2": {"Predictor", "OR", "95% CI low", "95% CI high", "p", "adjusted OR", "p (adj.)", "selected"},
        "Table 3": {"Model", "good", "poor", "AUC", "95% CI low", "95% CI high", "Accuracy", "Sensitivity",
                    "Specificity", "F1", "Threshold", "Note"},
        "DeLong": {"Model", *MODELS},
        "Calibration": {"Model", "Cohort", "Brier", "ECE", "Slope", "Intercept"},
        "Per-site": {"Model", "Site", "Role", "AUC", "95% CI low", "95% CI high"},
        "Fusion models": {"Model", "Inputs", "C", "gamma", "CV AUC", "Platt A", "Platt B", "Rounds", "ref C",
                          "ref CV AUC"},
        "Deep-learning signatures": {"Signature", "Site", "Split", "AUC", "95% CI low", "95% CI high", "bound"},
        "Disclosure control": {"Table", "Row", "Withheld", "Site", "Reason", "Quantity"},
    }
    for sec, headers in required.items():
        found = {h for t in tables_in(page, sec) for h in t["headers"]}
        assert headers <= found, (sec, headers - found)
    # one Table 1, Table 3 and DeLong matrix per cohort, under the cohort's label
    assert len(tables_in(page, "Table 1")) == len(tables_in(page, "Table 3")) == len(tables_in(page, "DeLong")) == 3
    for label in ("Training cohort", "Internal test", "External validation"):
        assert label in section(page, "Table 3") and label in section(page, "DeLong")


def test_numbers_are_formatted(built_run):
    page = parse(built_run[1])
    internal = {r[0]: r for r in tables_in(page, "Table 3")[1]["rows"]}  # cohorts in order: training, internal
    assert internal["FDL"][:6] == ["FDL", "12", "18", "0.841", "0.751", "0.921"]  # AUC and CI, 3 decimals
    assert internal["CRD"][3] == "0.851" and internal["CR"][3] == "0.740"
    t2 = {r[0]: r for t in tables_in(page, "Table 2") for r in t["rows"]}
    assert t2["post_ld"][1:5] == ["0.91", "0.87", "0.95", "<0.001"]  # OR 2 decimals, tiny p
    assert t2["cea"][4] == "0.0123"  # p to 3 significant digits
    assert t2["age"][5] == "–"  # not in the multivariable model
    matrix = {r[0]: r[1:] for r in tables_in(page, "DeLong")[0]["rows"]}
    assert matrix["FDL"] == ["·", "0.0123", "0.62"] and matrix["CR"][2] == "<0.001"
    assert fmt(0.5, "p") == "0.5" and fmt(1.0, "p") == "1" and fmt(float("nan")) == "&ndash;"
    assert fmt(2.0 / 3.0) == "0.667" and fmt(12.3456, "or") == "12.35" and fmt(41.0, "int") == "41"


def test_selected_predictors_are_highlighted(built_run):
    page = parse(built_run[1])
    (t2,) = tables_in(page, "Table 2")
    hl = {row[0] for row, cls in zip(t2["rows"], t2["classes"], strict=True) if cls == "hl"}
    assert hl == {"post_ld", "cea"}


def test_header_names_the_run(built_run):
    text = built_run[1].read_text(encoding="utf-8")
    head = text.split("<nav>")[0]
    for s in ("unit-report", "0123abcd4567ef89", "fedprox", "12 rounds", "flwr 1.41.0", "site_a (train)",
              "ext (external)", "2026-11-20", "at least k = 5"):
        assert s in head, s
    page = parse(built_run[1])
    assert "how to read" in " ".join(page.sections).lower()


def test_report_is_self_contained(built_run):
    text = built_run[1].read_text(encoding="utf-8")
    page = parse(built_run[1])
    assert len(page.imgs) == len(EXPECTED_FIGURES)
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert not re.search(r"https?://", text), "the report must not reference anything online"
    assert all(r.startswith(("data:", "#")) for r in page.refs)
    assert not {"script", "link", "iframe"} & set(page.tags)


def test_disclosure_lists_every_suppression_and_withheld_number(built_run):
    page = parse(built_run[1])
    disc = section(page, "Disclosure control")
    for s in SUPPRESSIONS:
        assert s["quantity"] in disc and s["reason"] in disc
    withheld = {(r[0], r[1]): r[2] for r in tables_in(page, "Disclosure control")[0]["rows"]}
    assert withheld[("Table 3", "CR / external")] == "accuracy, sensitivity, specificity, f1"
    assert withheld[("Per-site", "CR / site_b / test")] == "accuracy, sensitivity, specificity, f1"
    assert withheld[("DeLong", "external / CR / CRD")] == "p"
    assert withheld[("Signature AUC", "pre_t2w / site_b / test")] == "auc, lo, hi"
    assert ("Table 1", "external / crm, n (%)") in withheld
    assert not any(k[0] == "Table 1" and k[1].endswith("/ n") for k in withheld)  # "n" rows have no p by design
    # the note travels with the row in its own table (a footnote marker), and the withheld cell shows as a dash
    t3_external = tables_in(page, "Table 3")[2]["rows"]
    cr = next(r for r in t3_external if r[0] == "CR")
    assert cr[6] == "–" and cr[-1]
    text = built_run[1].read_text(encoding="utf-8")
    targets = re.findall(r'<li id="(n[0-9a-f]+-(\d+))">[^<]*binary_metrics[^<]*</li>', text)
    assert any(f'href="#{anchor}"' in text and mark in cr[-1].split(", ") for anchor, mark in targets)


def test_a_note_shared_by_many_rows_is_written_once_under_its_table() -> None:
    import html

    import pandas as pd

    from server.report import _table

    long = ("table_one.t_stage: cells with 0 < count < k=5 withheld (and complementary cells so that the "
            "totals do not reveal them); no test on counts that are not all released")
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "note": [f"roc.site_b: row one; {long}", long, ""]})
    out = _table(df, {"a": "A"}, note=True)
    assert out.count(html.escape(long)) == 1 and out.count("row one") == 1  # a reason's own ";" stays in it
    cells = re.findall(r"<td class=note>(.*?)</td>", out)
    assert [re.sub(r"<[^>]+>", "", c) for c in cells] == ["1, 2", "2", ""]
    assert _table(df, {"a": "A"}, note=True) == out  # deterministic anchors: the same page every time


def test_unknown_cohort_and_model_names_come_from_the_data(run_copy):
    perf = (run_copy / "tables" / "table3_performance.csv")
    perf.write_text(perf.read_text(encoding="utf-8").replace("external", "temporal_2025"), encoding="utf-8")
    curves = json.loads((run_copy / "report_data" / "curves.json").read_text(encoding="utf-8"))
    for c in curves["roc"]:
        c["cohort"] = c["cohort"].replace("external", "temporal_2025")
        c["model"] = c["model"].replace("CRD", "CRD v2")
    (run_copy / "report_data" / "curves.json").write_text(json.dumps(curves), encoding="utf-8")
    page = parse(build_report(run_copy))
    assert (run_copy / "figures" / "roc_temporal_2025.png").is_file()
    assert "temporal_2025" in section(page, "Table 3")


def test_missing_optional_inputs_say_not_available(run_copy):
    for name in ("table1_baseline", "table2_odds_ratios", "delong", "calibration", "per_site", "fusion_models",
                 "shap_importance", "suppressions", "signature_auc"):
        (run_copy / "tables" / f"{name}.csv").unlink()
    for f in ("report_data/curves.json", "config.yaml", "models/final.json"):
        (run_copy / f).unlink()
    page = parse(build_report(run_copy))
    for sec, why in (("Table 1", "table1_baseline.csv not found"), ("Table 2", "table2_odds_ratios.csv not found"),
                     ("DeLong", "delong.csv not found"), ("Calibration", "calibration.csv not found"),
                     ("Figures", "curves.json not found"), ("Per-site", "per_site.csv not found"),
                     ("Fusion models", "fusion_models.csv not found"),
                     ("Deep-learning signatures", "signature_auc.csv not found"),
                     ("Disclosure control", "suppressions.csv not found")):
        assert f"not available: tables/{why}" in section(page, sec) or f"not available: report_data/{why}" in \
            section(page, sec), sec
    assert "shap_importance.csv not found" in section(page, "Fusion models")
    assert tables_in(page, "Table 3") and not page.imgs
    head = (run_copy / "report.html").read_text(encoding="utf-8").split("<nav>")[0]
    assert re.search(r"Config digest</th><td><span class=\"na\">not recorded", head)
    assert "site_a" not in head  # no source said which sites took part


def test_empty_or_malformed_optional_inputs_do_not_crash(run_copy):
    (run_copy / "tables" / "suppressions.csv").write_text("quantity,site,reason\n", encoding="utf-8")
    (run_copy / "tables" / "delong.csv").write_text("", encoding="utf-8")
    curves = json.loads((run_copy / "report_data" / "curves.json").read_text(encoding="utf-8"))
    curves["roc"][0]["tpr"] = curves["roc"][0]["tpr"][:-3]  # length mismatch: that curve is skipped
    curves["roc"].append({"model": "FDL"})  # no cohort, no points
    curves["calibration"] = []
    del curves["decision"]
    (run_copy / "report_data" / "curves.json").write_text(json.dumps(curves), encoding="utf-8")
    page = parse(build_report(run_copy))
    assert "Nothing was suppressed." in section(page, "Disclosure control")
    assert "not available: tables/delong.csv is empty" in section(page, "DeLong")
    figs = section(page, "Figures")
    assert "no 'calibration' entries" in figs and "no 'decision' entries" in figs
    assert (run_copy / "figures" / "roc_training.png").is_file()


def test_missing_table3_is_a_clear_error(run_copy):
    (run_copy / "tables" / "table3_performance.csv").unlink()
    with pytest.raises(ReportError, match="table3_performance.csv") as err:
        build_report(run_copy)
    assert "rectalfl simulate --resume" in str(err.value)
    assert not (run_copy / "report.html").exists()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ReportError, match="not a run directory"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="no such directory"):
        build_report(tmp_path / "nowhere")


def test_a_report_written_as_the_last_stage_says_completed_not_running(run_copy):
    """The pipeline writes the report while the run record still says running (the run ends right after)."""
    from server.store import RunStore

    with RunStore.open_run_dir(run_copy) as store:
        store.start_run("r1", "unit-report", "name: unit-report\n", "0123abcd4567ef89", "federated", "fedavg", 1,
                        "simulation")

    def status_cell(path: Path) -> str:
        m = re.search(r"<th>Status</th>\s*<td>([^<]*)</td>", path.read_text(encoding="utf-8"))
        assert m, "no Status row in the header"
        return m.group(1)

    assert status_cell(build_report(run_copy)) == "running"  # what the record says
    assert status_cell(build_report(run_copy, status="completed")) == "completed"


def test_table3_publishes_the_auc_grid_bound_when_the_table_has_it(run_copy):
    import pandas as pd

    perf_path = run_copy / "tables" / "table3_performance.csv"
    assert "grid bound" not in tables_in(parse(build_report(run_copy)), "Table 3")[0]["headers"]
    perf = pd.read_csv(perf_path)
    perf["auc_bound"] = 0.0
    perf.loc[0, "auc_bound"] = 0.0123
    perf.to_csv(perf_path, index=False)
    page = parse(build_report(run_copy))
    first = tables_in(page, "Table 3")[0]
    col = first["headers"].index("grid bound")
    assert first["rows"][0][col] == "0.0123"
    assert "grid bound" in section(page, "Table 3")


def test_a_fit_that_did_not_converge_is_flagged(run_copy):
    """Convergence is reported, never assumed: the columns are shown and a non-converged fit is named."""
    import pandas as pd

    from server.report import not_converged

    fm_path = run_copy / "tables" / "fusion_models.csv"
    fm = pd.read_csv(fm_path)
    fm["converged"], fm["iterations"], fm["grad_norm"] = True, 7, 1e-9
    fm["platt_converged"], fm["cv_fits_converged"] = True, "15/15"
    fm.to_csv(fm_path, index=False)
    text = build_report(run_copy).read_text(encoding="utf-8")
    assert "Newton iterations" in text and "did not converge" not in text
    fm.loc[0, "converged"] = False
    fm.loc[1, "cv_fits_converged"] = "13/15"
    fm.to_csv(fm_path, index=False)
    text = build_report(run_copy).read_text(encoding="utf-8")
    first, second = str(fm.loc[0, "model"]), str(fm.loc[1, "model"])
    assert f"{first}: SVM fit did not converge" in text
    assert f"{second}: 13 of 15 cross-validation fits converged" in text
    t2 = pd.DataFrame({"predictor": ["cea", "age"], "uni_converged": [True, "False"], "multi_converged": ["", True]})
    assert not_converged(t2, None) == ["age: univariate logistic fit did not converge"]
