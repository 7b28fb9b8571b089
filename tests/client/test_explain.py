"""Grad-CAM / attention rollout on site, and the site-local page (``rectalfl site explain``)."""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from client.explain import ExplainError, choose_patients, explain, explain_site, mass_inside, saliency
from client.preprocess import load_manifest, load_slice
from client.train import SliceSet, train_backbone
from shared.config import TrainConfig
from shared.models import build_model, cpu_models, model_spec, signature_keys
from shared.records import flatten_states


def _site_slices(cfg, site: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cached slice of one backbone at one site, with its label and mask."""
    cache = Path(cfg.cache_root) / site
    labels = pd.read_csv(Path(cfg.data_root) / site / "patients.csv", dtype={"patient_id": str})
    labels = labels.set_index("patient_id")["response"]
    ok = load_manifest(cache).query("status == 'ok'")
    tp, seq = key.split("_", 1)
    ids = sorted(ok[(ok.timepoint == tp) & (ok.sequence == seq)]["patient_id"].astype(str))
    pairs = [load_slice(cache, p, tp, seq) for p in ids]
    return (np.stack([a for a, _ in pairs]).astype(np.float32)[:, None] / 255.0,
            labels.loc[ids].to_numpy(np.float32), np.stack([m for _, m in pairs]))


@pytest.mark.parametrize("name", cpu_models())
def test_maps_have_the_slice_shape_and_are_finite_in_0_1(name: str) -> None:
    net = build_model(name, 32, seed=0)
    x = torch.rand(3, 1, 32, 32)
    maps, prob = saliency(name, net, x)
    assert maps.shape == (3, 32, 32)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert prob.shape == (3,) and ((prob > 0) & (prob < 1)).all()


@pytest.mark.parametrize("name", ["densenet_tiny", "resnet_tiny", "convnext_t_tiny", "swin_t_tiny", "vit_tiny"])
def test_maps_of_a_trained_network_differ_from_the_untrained_one(tiny_consortium, name: str) -> None:
    cfg = tiny_consortium
    x, y, _ = _site_slices(cfg, "site_a", "pre_t2w")
    data = SliceSet("pre_t2w", x, y, [str(i) for i in range(len(y))], np.array(["train"] * len(y), dtype=object))
    untrained = build_model(name, 32, seed=3)
    trained = build_model(name, 32, seed=3)
    train_backbone(trained, data, TrainConfig(lr=0.05, batch_size=8), epochs=4, seed=0)
    batch = torch.from_numpy(x[:4])
    before, _ = saliency(name, untrained, batch)
    after, _ = saliency(name, trained, batch)
    assert before.shape == after.shape == (4, 32, 32)
    assert np.isfinite(after).all()
    assert np.abs(before - after).mean() > 1e-3


def test_grad_cam_explains_the_predicted_class() -> None:
    # Feature channel 0 sees the left half, channel 1 the right half; logit = mean(ch0) - mean(ch1).
    # Explaining "good" (the logit) must highlight the left, explaining "poor" (its negative) the right.
    from client.explain import grad_cam

    class Halves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            left = torch.zeros(1, 1, 32, 32)
            left[..., :16] = 1.0
            self.feat = torch.nn.Conv2d(1, 2, 1, bias=False)
            torch.nn.init.ones_(self.feat.weight)
            self.register_buffer("halves", torch.cat([left, 1 - left], dim=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.feat(x) * self.halves
            return (f[:, 0].mean(dim=(1, 2)) - f[:, 1].mean(dim=(1, 2))).reshape(-1, 1)

    net = Halves()
    net.feat.register_forward_hook(lambda m, i, o: o * net.halves)  # the hooked output is the masked map
    x = torch.ones(2, 1, 32, 32)
    good = grad_cam(net, "feat", x, torch.tensor([1.0, 1.0]))
    poor = grad_cam(net, "feat", x, torch.tensor([-1.0, -1.0]))
    assert good[:, :, :14].min() > 0.9 and good[:, :, 18:].max() < 0.1
    assert poor[:, :, 18:].min() > 0.9 and poor[:, :, :14].max() < 0.1


def test_mass_inside_the_mask() -> None:
    maps = np.zeros((2, 4, 4))
    maps[0, :2] = 1.0  # all evidence in the top half
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[:, :2] = 1
    share = mass_inside(maps, masks)
    assert share[0] == pytest.approx(1.0) and np.isnan(share[1])  # an all-zero map has no share


def test_patient_choice_prefers_held_out_patients_and_both_classes() -> None:
    ids = [f"p{i}" for i in range(12)]
    labels = pd.Series([1] * 6 + [0] * 6, index=ids)
    splits = pd.Series(["train", "train", "train", "test", "test", "val"] * 2, index=ids)
    chosen = choose_patients(labels, splits, set(ids), per_class=2, seed=1)
    assert len(chosen) == 4
    assert [labels[p] for p in chosen] == [1, 1, 0, 0]
    assert all(splits[p] == "test" for p in chosen)


# --------------------------------------------------------------------------- the page from a run folder


def _run_folder(cfg, root: Path, name: str = "densenet_tiny") -> Path:
    """A run folder as the pipeline writes it (models/final.npz + final.json + config.yaml), seeded weights."""
    run = root / "run-1"
    (run / "models").mkdir(parents=True)
    cfg = cfg.model_copy(deep=True)
    cfg.train.backbone = name
    states = {}
    for key in signature_keys(cfg):
        states[key] = OrderedDict(build_model(name, cfg.preprocess.slice_size, seed=1).state_dict())
    np.savez(run / "models" / "final.npz", **flatten_states(states))
    (run / "models" / "final.json").write_text(json.dumps({"network": name, "backbones": signature_keys(cfg),
                                                           "slice_size": cfg.preprocess.slice_size}))
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_site_page_lives_in_the_cache_and_embeds_everything(tiny_consortium, tmp_path: Path) -> None:
    cfg = tiny_consortium
    run = _run_folder(cfg, tmp_path)
    cache = tmp_path / "cache_a"
    shutil.copytree(Path(cfg.cache_root) / "site_a", cache)
    res = explain_site(run, Path(cfg.data_root) / "site_a", cache, per_class=2)
    assert res.page == cache / "explain" / "run-1" / "index.html"
    text = res.page.read_text()
    assert "Site-local page" in text
    # self-contained: figures inline, no external reference
    assert "data:image/png;base64," in text
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", text)
    rows = res.rows
    assert set(rows["backbone"]) == set(signature_keys(cfg))
    assert sorted(rows.groupby("patient_id")["label"].first().value_counts().to_dict().items()) == [(0, 2), (1, 2)]
    assert rows["probability"].between(0, 1).all()
    assert text.count("<div class='card'>") == len(rows)
    assert pd.read_csv(res.summary).shape[0] == len(rows)
    # each card names its patient, label and prediction
    first = rows.iloc[0]
    assert first["patient_id"] in text and f"P(good) = {first['probability']:.2f}" in text


def test_transformer_run_page_uses_attention_rollout(tiny_consortium, tmp_path: Path) -> None:
    cfg = tiny_consortium
    run = _run_folder(cfg, tmp_path, "vit_tiny")
    res = explain_site(run, Path(cfg.data_root) / "ext", Path(cfg.cache_root) / "ext", per_class=1,
                       backbones=["pre_t2w"], out_dir=tmp_path / "page")
    assert "attention rollout" in res.page.read_text()
    assert set(res.rows["split"]) == {"external"}  # the external site's patients are all external
    assert model_spec("vit_tiny").cam_method == "rollout"


def test_missing_run_files_and_size_mismatch_give_clear_errors(tiny_consortium, tmp_path: Path) -> None:
    cfg = tiny_consortium
    with pytest.raises(ExplainError, match="final.json not found"):
        explain_site(tmp_path, Path(cfg.data_root) / "site_a", Path(cfg.cache_root) / "site_a")
    run = _run_folder(cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"slice_size": 64})}),
                      tmp_path)
    with pytest.raises(ExplainError, match="expect 64"):
        explain_site(run, Path(cfg.data_root) / "site_a", Path(cfg.cache_root) / "site_a", out_dir=tmp_path / "x")
    with pytest.raises(ExplainError, match="not in this run"):
        explain_site(run, Path(cfg.data_root) / "site_a", Path(cfg.cache_root) / "site_a", backbones=["pre_adc"])


def test_command_writes_the_page_and_sends_nothing(tiny_consortium, tmp_path: Path, monkeypatch) -> None:
    # Nothing to send through: any socket the command opened would fail this test.
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("site explain opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = tiny_consortium
    run = _run_folder(cfg, tmp_path)
    cache = tmp_path / "cache_b"
    shutil.copytree(Path(cfg.cache_root) / "site_b", cache)
    app = typer.Typer()
    site = typer.Typer()
    site.command("explain")(explain)
    app.add_typer(site, name="site")
    res = CliRunner().invoke(app, ["site", "explain", "--run", str(run), "--data", str(Path(cfg.data_root) / "site_b"),
                                   "--cache", str(cache), "--per-class", "1", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)  # logs go to stderr
    assert Path(info["page"]).is_file() and Path(info["page"]).is_relative_to(cache)
    assert info["patients"] == 2
    bad = CliRunner().invoke(app, ["site", "explain", "--run", str(tmp_path / "nope"), "--data", "x", "--cache", "y"])
    assert bad.exit_code == 2 and "final.json not found" in bad.output.replace("\n", "")
