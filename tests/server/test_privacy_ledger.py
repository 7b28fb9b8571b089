"""The operator's privacy ledger: tables/privacy_ledger.csv, the DP block of final.json, the report, the summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from server.privacy_ledger import COLUMNS, record_privacy
from server.store import RunStore
from shared.config import parse_config

RUN = "run-dp"


def _cfg(dp: bool = True):
    privacy = {"dp": True, "noise_multiplier": 1.1, "max_grad_norm": 0.7, "accountant": "rdp"} if dp else {}
    return parse_config({"name": "dp", "preprocess": {"slice_size": 32}, "train": {"backbone": "densenet_tiny"},
                         "privacy": privacy})


def _site_reply(eps: float, rounds: int, q: float = 0.25) -> dict[str, float]:
    return {"epsilon": eps, "dp-delta": 1e-3, "dp-noise-multiplier": 1.1, "dp-max-grad-norm": 0.7,
            "dp-sample-rate": q, "dp-steps": 8.0 * rounds, "dp-rounds": float(rounds), "train-loss": 0.5,
            "num-examples": 30.0}


@pytest.fixture
def run_with_store(tmp_path: Path):
    cfg = _cfg()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "final.json").write_text(json.dumps({"network": "densenet_tiny"}))
    store = RunStore.open_run_dir(tmp_path)
    store.start_run(RUN, "dp", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 42, "simulation")
    for rnd in (1, 2):
        store.log_metrics(RUN, "train", "site_a", _site_reply(1.5 * rnd, rnd), round=rnd, split="train")
    store.log_metrics(RUN, "train", "site_b", _site_reply(2.25, 1, q=0.5), round=1, split="train")
    store.log_metrics(RUN, "evaluate", "site_a", {"pre_t2w/auc": 0.7})
    yield cfg, tmp_path, store
    store.close()


def test_ledger_table_holds_each_sites_latest_report(run_with_store) -> None:
    cfg, run_dir, store = run_with_store
    table = record_privacy(cfg, run_dir, store, RUN)
    csv = pd.read_csv(run_dir / "tables" / "privacy_ledger.csv")
    assert tuple(csv.columns) == COLUMNS
    assert csv["site"].tolist() == ["site_a", "site_b"] and set(csv["stage"]) == {"train"}
    a = csv.set_index("site").loc["site_a"]
    assert a["epsilon"] == 3.0 and a["rounds"] == 2 and a["delta"] == 1e-3 and a["noise_multiplier"] == 1.1
    assert a["max_grad_norm"] == 0.7 and a["sample_rate"] == 0.25 and a["accountant"] == "rdp"
    assert csv.set_index("site").loc["site_b", "epsilon"] == 2.25
    assert table is not None and len(table) == 2
    arts = store.artefacts(RUN)
    assert "tables/privacy_ledger.csv" in set(arts["path"])


def test_final_json_records_the_dp_settings_and_the_architecture_change(run_with_store) -> None:
    cfg, run_dir, store = run_with_store
    record_privacy(cfg, run_dir, store, RUN)
    meta = json.loads((run_dir / "models" / "final.json").read_text())
    p = meta["privacy"]
    assert p["dp"] is True and p["noise_multiplier"] == 1.1 and p["max_grad_norm"] == 0.7 and p["delta"] == "auto"
    assert p["accountant"] == "rdp" and p["target_epsilon"] is None
    assert p["architecture_change"]["tool"] == "opacus.validators.ModuleValidator.fix"
    n_layers = len(p["architecture_change"]["layers"])
    assert n_layers > 0 and p["architecture_change"]["summary"] == f"BatchNorm2d -> GroupNorm in {n_layers} layers"
    assert meta["architecture_change"] == p["architecture_change"]["summary"]
    assert p["epsilon"] == {"site_a/train": 3.0, "site_b/train": 2.25}
    assert meta["network"] == "densenet_tiny"  # the rest of the metadata is kept


def test_without_dp_there_is_no_ledger_table(tmp_path: Path) -> None:
    cfg = _cfg(dp=False)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "final.json").write_text("{}")
    with RunStore.open_run_dir(tmp_path) as store:
        store.start_run(RUN, "dp", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 42, "simulation")
        store.log_metrics(RUN, "train", "site_a", {"train-loss": 0.4}, round=1)
        assert record_privacy(cfg, tmp_path, store, RUN) is None
    assert not (tmp_path / "tables" / "privacy_ledger.csv").exists()
    assert json.loads((tmp_path / "models" / "final.json").read_text())["privacy"] == {"dp": False}


def _report_dir(tmp_path: Path, dp: bool) -> Path:
    from tests.server.report.conftest import write_run_dir

    rd = write_run_dir(tmp_path / "run")
    if dp:
        cfg = _cfg()
        with RunStore.open_run_dir(rd) as store:
            store.start_run(RUN, "dp", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 42, "simulation")
            store.log_metrics(RUN, "train", "site_a", _site_reply(4.321, 3), round=3)
            store.log_metrics(RUN, "train", "site_b", _site_reply(6.789, 3), round=3)
            record_privacy(cfg, rd, store, RUN)
        shutil.copy(rd / "tables" / "privacy_ledger.csv", tmp_path / "ledger.csv")
    return rd


def _section(html_text: str, sid: str) -> str:
    start = html_text.index(f'<section id="{sid}">')
    return html_text[start: html_text.index("</section>", start)]


def test_report_privacy_section_shows_the_ledger_and_points_to_the_disclosure_log(tmp_path: Path) -> None:
    from server.report import build_report

    rd = _report_dir(tmp_path, dp=True)
    page = build_report(rd).read_text(encoding="utf-8")
    sec = _section(page, "privacy")
    assert "<h2>Privacy</h2>" in sec and "site_a" in sec and "site_b" in sec
    assert "4.321" in sec and "6.789" in sec and "rdp" in sec
    assert "BatchNorm2d -&gt; GroupNorm" in sec or "BatchNorm2d -> GroupNorm" in sec
    assert "tables/suppressions.csv" in sec and 'href="#disclosure"' in sec
    assert '<a href="#privacy">' in page  # in the navigation


def test_report_privacy_section_says_when_dp_was_off(tmp_path: Path) -> None:
    from server.report import build_report

    rd = _report_dir(tmp_path, dp=False)
    sec = _section(build_report(rd).read_text(encoding="utf-8"), "privacy")
    assert "Differential privacy was off" in sec and "tables/suppressions.csv" in sec
    assert "<table>" not in sec


def test_run_summary_states_the_architecture_change_and_the_largest_epsilon(tmp_path: Path) -> None:
    from server.summary import print_summary

    rd = _report_dir(tmp_path, dp=True)
    console = Console(record=True, width=400)
    print_summary(rd, console)
    text = console.export_text()
    line = next(x for x in text.splitlines() if x.startswith("differential privacy:"))
    assert "BatchNorm2d -> GroupNorm in" in line and "ModuleValidator.fix" in line
    assert "largest epsilon 6.79 (site_b" in line and "privacy_ledger.csv" in line
