"""The config schema: every shipped file validates; bad keys/values fail naming key, value, allowed."""

from pathlib import Path

import pytest

from shared.config import ConfigError, load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
assert CONFIGS, "no configs/*.yaml found next to tests/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name
    assert len(cfg.digest()) == 16


def test_paper_config_is_faithful_to_the_published_settings() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "paper.yaml")
    assert cfg.preprocess.slice_size == 256
    assert cfg.train.backbone == "densenet121"
    assert cfg.train.lr == 0.01 and cfg.train.batch_size == 32
    assert cfg.train.crop_scale == (0.8, 1.0) and cfg.train.crop_ratio == (0.9, 1.1)
    assert cfg.split.scheme == "8:1:1" and cfg.split.cv_folds == 5


def test_unknown_key_names_the_dotted_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"preprocess": {"slize_size": 128}})
    msg = str(err.value)
    assert "preprocess.slize_size" in msg
    assert "slice_size" in msg  # the allowed keys are listed


def test_bad_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": {"strategy": "fedsgd"}})
    msg = str(err.value)
    assert "federation.strategy" in msg and '"fedsgd"' in msg
    assert "fedavg" in msg and "fedprox" in msg and "fedadam" in msg


def test_out_of_range_value_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"train": {"lr": -1}})
    assert "train.lr = -1" in str(err.value)


def test_inverted_percentiles_rejected() -> None:
    with pytest.raises(ConfigError, match="clip_percentiles"):
        parse_config({"preprocess": {"clip_percentiles": [99, 1]}})


def test_duplicate_site_names_rejected() -> None:
    sites = [{"name": "a", "patients": 10}, {"name": "a", "patients": 12}]
    with pytest.raises(ConfigError, match="unique"):
        parse_config({"synth": {"sites": sites}})


def test_single_sequence_site_is_legitimate() -> None:
    cfg = parse_config({"data": {"sequences": ["t2w"], "timepoints": ["pre"]}})
    assert cfg.data.sequences == ["t2w"]


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_apply_dotted_keys_and_are_validated() -> None:
    cfg = load_config(None, {"federation.rounds": 3})
    assert cfg.federation.rounds == 3
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(None, {"federation.rounds": 0})


def test_digest_changes_with_content() -> None:
    assert parse_config({}).digest() != parse_config({"seed": 7}).digest()
