"""Everything in a config is validated when it loads, before any work starts (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.config import BACKBONES, ConfigError, load_config, parse_config

runner = CliRunner()


def flat(text: str) -> str:
    return "".join(text.split())


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\nfederation:\n  rounds: 3\n  strategy: fedavg\n  rounds: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert f"{p}:5" in msg and "'rounds'" in msg and "lines 3 and 5" in msg


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    p = write(tmp_path, "seed: 1\nname: a\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"'seed' is given twice .*lines 1 and 3"):
        load_config(p)


def test_same_key_in_different_sections_is_fine(tmp_path: Path) -> None:
    p = write(tmp_path, "preprocess:\n  workers: 2\nfederation:\n  rounds: 2\ntrain:\n  seed: 3\nseed: 4\n")
    cfg = load_config(p)
    assert cfg.train.seed == 3 and cfg.seed == 4


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_empty_file_is_refused(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match="empty"):
        load_config(p)


def test_yaml_error_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).startswith(f"{p}:3: not valid YAML") and "<unicode string>" not in str(err.value)
    p = write(tmp_path, "name: x\n  indented: 1\n", "d.yaml")
    with pytest.raises(ConfigError, match=rf"{p}:2: not valid YAML.*line 2"):
        load_config(p)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_backbone_names_are_checked_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"backbone": "densenet12"}}, source="f.yaml")
    msg = str(err.value)
    assert "train.backbone" in msg and "densenet121" in msg and "did you mean" in msg


def test_backbone_list_matches_the_model_registry() -> None:
    from shared.models import available_models

    assert set(BACKBONES) == set(available_models("classification"))


def test_vit_patch_must_divide_the_slice_size() -> None:
    with pytest.raises(ConfigError, match="multiple of 16"):
        parse_config({"train": {"backbone": "vit"}, "preprocess": {"slice_size": 40}})
    assert parse_config({"train": {"backbone": "vit_tiny"}, "preprocess": {"slice_size": 32}})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_valid_devices(device: str) -> None:
    assert parse_config({"train": {"device": device}}).train.device == device


@pytest.mark.parametrize("device", ["gpu7", "cuda:", "cuda:x", "CPU", "cuda0", ""])
def test_invalid_devices(device: str) -> None:
    with pytest.raises(ConfigError, match="train.device"):
        parse_config({"train": {"device": device}})


def test_dp_without_its_settings_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"neither privacy.noise_multiplier .* nor privacy.target_epsilon"):
        parse_config({"privacy": {"dp": True}})
    with pytest.raises(ConfigError, match=r"privacy.dp_noise_multiplier is now privacy.noise_multiplier"):
        parse_config({"privacy": {"dp": False, "dp_noise_multiplier": 2.0}})
    assert parse_config({"privacy": {"dp": True, "noise_multiplier": 1.0}}).privacy.dp is True


def test_command_line_setting_is_named_as_such(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, {"federation.mode": "pool"}, override_names={"federation.mode": "--mode"})
    msg = str(err.value)
    assert "command line" in msg and "--mode" in msg and "federation.mode" in msg
    # an error in the file itself is not blamed on the command line
    p = write(tmp_path, "federation:\n  strategy: fedsgd\n", "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(p, {"federation.rounds": 3}, override_names={"federation.rounds": "--rounds"})
    line = next(x for x in str(err.value).splitlines() if "federation.strategy" in x)
    assert "command line" not in line


def test_exclusion_rule_setting() -> None:
    assert parse_config({}).check.exclusion == "patient"
    assert parse_config({"check": {"exclusion": "volume"}}).check.exclusion == "volume"
    with pytest.raises(ConfigError, match="check.exclusion"):
        parse_config({"check": {"exclusion": "site"}})


# --------------------------------------------------------------------------- through the command line


def test_simulate_names_the_bad_option(tmp_path: Path) -> None:
    from rectalfl import app

    p = write(tmp_path, f"name: t\ndata_root: {tmp_path / 'data'}\n")
    res = runner.invoke(app, ["simulate", "--config", str(p), "--mode", "pool"])
    assert res.exit_code == 2
    assert "--mode" in res.output and "commandline" in flat(res.output)
    assert not (tmp_path / "data").exists()


def test_resume_of_a_missing_run_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rectalfl import app

    monkeypatch.chdir(tmp_path)  # no configs/ here: --resume must not need one
    res = runner.invoke(app, ["simulate", "--resume", "runs/nope"])
    assert res.exit_code == 2
    assert "runs/nopedoesnotexist" in flat(res.output) and "configfile" not in flat(res.output)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    res = runner.invoke(app, ["simulate", "--resume", "runs/empty"])
    assert res.exit_code == 2 and "isnotarundirectory" in flat(res.output)


def test_resume_refuses_options_that_would_change_the_run(tmp_path: Path) -> None:
    from rectalfl import app

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.yaml").write_text("name: r\n")
    res = runner.invoke(app, ["simulate", "--resume", str(rd), "--mode", "pooled"])
    assert res.exit_code == 2 and "--mode" in res.output and "cannotchangeit" in flat(res.output)


def test_existing_run_dir_is_refused_before_any_work(tmp_path: Path) -> None:
    from rectalfl import app

    rd = tmp_path / "runs" / "taken"
    rd.mkdir(parents=True)
    (rd / "run.db").write_text("")
    p = write(tmp_path, f"name: t\ndata_root: {tmp_path / 'data'}\ncache_root: {tmp_path / 'cache'}\n")
    res = runner.invoke(app, ["simulate", "--config", str(p), "--run-dir", str(rd)])
    assert res.exit_code == 2 and "alreadyexists" in flat(res.output) and "--resume" in res.output
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()  # nothing started


def test_config_validate_reports_duplicate_and_empty_files(tmp_path: Path) -> None:
    from rectalfl import app

    dup = write(tmp_path, "seed: 1\nseed: 2\n", "dup.yaml")
    empty = write(tmp_path, "", "empty.yaml")
    res = runner.invoke(app, ["config", "validate", str(dup)])
    assert res.exit_code == 2 and "lines1and2" in flat(res.output)
    res = runner.invoke(app, ["config", "validate", str(empty)])
    assert res.exit_code == 2 and "empty" in res.output
