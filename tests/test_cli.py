"""The command line: exit codes, --json output, clear errors (typer's runner, real files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from rectalfl import app

runner = CliRunner()


def _write_cfg(cfg, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def test_help_lists_the_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("synth", "site", "simulate", "demo", "config"):
        assert cmd in res.output


def test_config_validate_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"federation": {"strategy": "fedsgd"}}))
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    assert "federation.strategy" in res.output and "fedavg" in res.output


def test_site_check_json_on_a_clean_site(tiny_consortium, tmp_path: Path) -> None:
    cfg_path = _write_cfg(tiny_consortium, tmp_path / "cfg.yaml")
    site = Path(tiny_consortium.data_root) / "site_a"
    res = runner.invoke(app, ["site", "check", str(site), "--config", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    n = next(s.patients for s in tiny_consortium.synth.sites if s.name == "site_a")
    assert report["n_patients"] == n and not [i for i in report["issues"] if i["severity"] == "error"]


def test_site_check_fails_with_exit_1_and_names_the_file(tiny_consortium, tmp_path: Path) -> None:
    site = tmp_path / "site_a"
    shutil.copytree(Path(tiny_consortium.data_root) / "site_a", site)
    victim = sorted(site.glob("images/*/pre/t2w.nii.gz"))[0]
    victim.write_bytes(b"not an image at all")
    cfg_path = _write_cfg(tiny_consortium, tmp_path / "cfg.yaml")
    res = runner.invoke(app, ["site", "check", str(site), "--config", str(cfg_path)])
    assert res.exit_code == 1
    assert victim.parent.parent.name in res.output and "unreadable_file" in res.output


def test_site_check_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["site", "check", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nowhere" in res.output


def test_site_preprocess_json_reports_statuses(tiny_consortium, tmp_path: Path) -> None:
    cfg_path = _write_cfg(tiny_consortium, tmp_path / "cfg.yaml")
    site = Path(tiny_consortium.data_root) / "site_b"
    out = tmp_path / "cache"
    res = runner.invoke(app, ["site", "preprocess", str(site), "--out", str(out), "--config", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    n = next(s.patients for s in tiny_consortium.synth.sites if s.name == "site_b")
    volumes = len(tiny_consortium.data.sequences) * len(tiny_consortium.data.timepoints)
    assert info["status"] == {"ok": n * volumes} and (out / "manifest.csv").is_file()
