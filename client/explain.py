"""What the networks look at, computed and shown at the hospital only (``rectalfl site explain``).

For a sample of good and poor responders of this site, every backbone of a finished run (its final
weights, ``RUN_DIR/models/final.npz`` + ``final.json``) is applied to the patient's own cached
slice (:func:`client.preprocess.load_slice`) and explained:

* CNNs and Swin: Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391) with MONAI's
  :class:`monai.visualize.GradCAM` on the layer the registry names (:attr:`shared.models.ModelSpec.cam_layer`:
  the last convolutional feature map, or the last Swin stage);
* ViT: attention rollout (Abnar & Zuidema 2020, arXiv:2005.00928) through every block, from the
  class token to the patches.

Grad-CAM explains the *predicted* class: the network's logit for a predicted good responder, its
negative for a predicted poor responder. Each map is scaled to [0, 1] (a map with no positive
evidence is all zeros). The page also gives the share of the map inside the reference tumour mask.

Where it lives: ``CACHE/explain/<run-id>/index.html`` (and ``summary.csv``), inside the site's own
cache. It shows images and patient identifiers, so it stays there: nothing in this module sends
anything, no Flower message type exists for it, and an operator cannot ask for it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from shared.cli import ConfigOpt, JsonOpt, console, fail, out
from shared.config import ConfigError, RectalFLConfig, load_config

if TYPE_CHECKING:  # torch, MONAI and pandas load when a map is made, so the `rectalfl` command starts fast
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

EXPLAIN_DIR = "explain"
"""Sub-folder of the site's cache that holds the pages (one folder per run)."""


class ExplainError(RuntimeError):
    """The run folder, the site folder or the cache lacks what the page needs; the message says what to do."""


# --------------------------------------------------------------------------- saliency maps


def _signed(model: nn.Module, sign: torch.Tensor) -> nn.Module:
    """``model``'s one logit times +1 (explain "good response") or -1 (explain "poor response") per sample."""
    from torch import nn

    class Signed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).reshape(x.shape[0], 1) * sign

    return Signed()


def _normalise(maps: torch.Tensor) -> np.ndarray:
    """``(B, H, W)`` -> each map scaled to [0, 1]; a map without positive evidence stays all zeros."""
    import torch

    m = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    flat = m.reshape(m.shape[0], -1)
    lo = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - lo)
    return torch.where(span > 1e-12, (m - lo) / span.clamp_min(1e-12), torch.zeros_like(m)).cpu().numpy()


def grad_cam(model: nn.Module, layer: str, x: torch.Tensor, sign: torch.Tensor) -> np.ndarray:
    """Grad-CAM of ``model``'s logit times ``sign`` with MONAI's GradCAM on ``layer``.

    Parameters
    ----------
    model : nn.Module
        A registry classifier (one logit).
    layer : str
        Module name in ``model.named_modules()``.
    x : Tensor of shape (B, 1, S, S)
    sign : Tensor of shape (B,)
        +1 to explain the logit (good response), -1 its negative (poor response).

    Returns
    -------
    ndarray of shape (B, S, S), float in [0, 1]
    """
    from monai.visualize import GradCAM

    if layer not in dict(model.named_modules()):
        raise ValueError(f"Grad-CAM layer {layer!r} not found in {type(model).__name__}")
    wrapped = _signed(model, sign.reshape(-1, 1).to(x.dtype))
    cam = GradCAM(nn_module=wrapped, target_layers=f"model.{layer}", postprocessing=lambda m: m)
    # the input takes part in the graph so that full backward hooks on early layers fire normally
    maps = cam(x.detach().clone().requires_grad_(True), class_idx=0)  # (B, 1, S, S), upsampled by MONAI
    return _normalise(maps[:, 0])


def attention_rollout(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Attention rollout of a registry ViT: the class token's attention to each patch through every block.

    Each block's attention (mean over heads) is mixed half-and-half with the identity for the
    residual path, rows renormalised, and the blocks multiplied in order.

    Returns
    -------
    ndarray of shape (B, S, S), float in [0, 1]
    """
    import torch
    import torch.nn.functional as F

    vit = getattr(model, "vit", None)
    if vit is None or not hasattr(vit, "blocks"):
        raise ValueError(f"attention rollout needs a registry ViT, got {type(model).__name__}")
    attns = [blk.attn for blk in vit.blocks]
    saved = [a.save_attn for a in attns]
    was_training = model.training
    model.eval()
    try:
        for a in attns:
            a.save_attn = True
        with torch.no_grad():
            model(x)
        mats = [a.att_mat.mean(dim=1) for a in attns]  # (B, N+1, N+1) each
    finally:
        for a, s in zip(attns, saved, strict=True):
            a.save_attn = s
        model.train(was_training)
    n = mats[0].shape[-1]
    eye = torch.eye(n, dtype=mats[0].dtype)
    roll = eye.expand_as(mats[0]).clone()
    for att in mats:
        a = 0.5 * att + 0.5 * eye
        roll = (a / a.sum(dim=-1, keepdim=True)) @ roll
    grid = int(round((n - 1) ** 0.5))
    cls_to_patch = roll[:, 0, 1:].reshape(-1, 1, grid, grid)
    up = F.interpolate(cls_to_patch, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return _normalise(up[:, 0])


def saliency(network: str, model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The registry's explanation of ``network`` for slices ``x`` and the predicted probabilities.

    Parameters
    ----------
    network : str
        Registry name (decides Grad-CAM layer or attention rollout).
    model : nn.Module
    x : Tensor of shape (B, 1, S, S), in [0, 1]

    Returns
    -------
    maps : ndarray of shape (B, S, S) in [0, 1]
    prob : ndarray of shape (B,), probability of a good response
    """
    import torch

    from shared.models import model_spec

    spec = model_spec(network)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"slices must have shape (B, 1, S, S), got {tuple(x.shape)}")
    model.eval()
    with torch.no_grad():
        prob = torch.sigmoid(model(x).reshape(-1)).double().numpy()
    if spec.cam_method == "rollout":
        return attention_rollout(model, x), prob
    if spec.cam_method != "gradcam" or not spec.cam_layer:
        raise ValueError(f"network {network!r} has no explanation method in the registry")
    sign = torch.where(torch.from_numpy(prob) >= 0.5, 1.0, -1.0)
    return grad_cam(model, spec.cam_layer, x, sign), prob


def mass_inside(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's total inside its tumour mask, shape (B,); NaN for an all-zero map or empty mask."""
    import numpy as np

    total = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * (masks > 0)).reshape(len(maps), -1).sum(axis=1)
    has_mask = (masks > 0).reshape(len(masks), -1).any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((total > 0) & has_mask, inside / np.where(total > 0, total, 1.0), np.nan)


# --------------------------------------------------------------------------- the run's final models


@dataclass
class RunModels:
    """A finished run's final networks as this site loads them."""

    run_id: str
    network: str
    slice_size: int
    models: dict[str, nn.Module]
    cfg: RectalFLConfig
    meta: dict[str, Any] = field(default_factory=dict)


def load_run_models(run_dir: Path, config: Path | None = None, backbones: Sequence[str] | None = None) -> RunModels:
    """Read ``models/final.json`` + ``final.npz`` (and ``config.yaml`` for the label and split settings).

    Raises
    ------
    ExplainError
        When a file is missing or the weights do not fit the network named in ``final.json``.
    """
    import numpy as np

    from shared.models import build_model
    from shared.records import unflatten_states

    run_dir = Path(run_dir)
    meta_path, weights = run_dir / "models" / "final.json", run_dir / "models" / "final.npz"
    for p in (meta_path, weights):
        if not p.is_file():
            raise ExplainError(f"{p} not found: give --run the run folder (or a copy of its models/ folder and "
                               "config.yaml) of a finished run")
    meta = json.loads(meta_path.read_text())
    cfg_path = config or (run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None)
    try:
        cfg = load_config(cfg_path)
    except ConfigError as exc:
        raise ExplainError(str(exc)) from None
    network, size = str(meta["network"]), int(meta["slice_size"])
    keys = list(meta.get("backbones", []))
    if backbones:
        unknown = sorted(set(backbones) - set(keys))
        if unknown:
            raise ExplainError(f"backbone(s) {unknown} not in this run; it has {', '.join(keys)}")
        keys = [k for k in keys if k in backbones]
    with np.load(weights) as z:
        states = unflatten_states({k: z[k] for k in z.files})
    models = {}
    for key in keys:
        if key not in states:
            raise ExplainError(f"{weights} has no weights for backbone {key}")
        m = build_model(network, size)
        try:
            missing, unexpected = m.load_state_dict(states[key], strict=False)
        except RuntimeError as exc:
            raise ExplainError(f"{weights}: weights of {key} do not fit network {network!r}: {exc}") from None
        bad = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
        if bad:
            raise ExplainError(f"{weights}: weights of {key} do not fit network {network!r}: {bad[:5]}")
        models[key] = m.eval()
    return RunModels(run_dir.resolve().name, network, size, models, cfg, meta)


# --------------------------------------------------------------------------- choosing patients


def choose_patients(labels: pd.Series, splits: pd.Series, available: set[str], per_class: int,
                    seed: int = 0) -> list[str]:
    """Up to ``per_class`` good and ``per_class`` poor responders, held-out patients first.

    Parameters
    ----------
    labels : Series of 0/1 indexed by patient_id
    splits : Series of split names indexed by patient_id (``test``/``external`` come first, then ``val``, ``train``)
    available : patient ids with at least one cached slice
    """
    import numpy as np

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    order = {"external": 0, "test": 0, "val": 1, "train": 2}
    chosen: list[str] = []
    for cls in (1, 0):
        ids = sorted(p for p in labels.index[labels == cls] if p in available)
        rng.shuffle(ids)
        ids.sort(key=lambda p: order.get(str(splits.get(p, "train")), 3))  # stable: shuffled within a split
        chosen += ids[:per_class]
    return chosen


# --------------------------------------------------------------------------- the page


@dataclass
class ExplainResult:
    page: Path
    summary: Path
    rows: pd.DataFrame
    """One row per (backbone, patient): label, probability, split, share of the map inside the tumour."""


def _png(image: np.ndarray, mask: np.ndarray, cam: np.ndarray, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4.2, 2.45), dpi=110)
    for ax in axes:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if mask.any():
            ax.contour(mask > 0, levels=[0.5], colors=["#00e0ff"], linewidths=0.8)
    axes[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    axes[0].set_title("slice + tumour", fontsize=8)
    axes[1].set_title(title, fontsize=8)
    fig.tight_layout(pad=0.6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1b1b1b;max-width:1200px}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.warn{background:#fff4e5;border-left:4px solid #e69f00;padding:.6rem .9rem;margin:1rem 0}
.grid{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #ddd;border-radius:6px;padding:.4rem;width:470px}
.card img{width:100%}.meta{font-size:.85rem}.good{color:#009E73;font-weight:600}.poor{color:#D55E00;font-weight:600}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.2rem .5rem}
"""


def _page(site: str, runs: RunModels, rows: pd.DataFrame, cards: dict[str, list[str]]) -> str:
    import numpy as np

    from shared.models import model_spec

    e = html.escape
    method = {"gradcam": f"Grad-CAM (MONAI GradCAM) on layer <code>{e(str(model_spec(runs.network).cam_layer))}</code>",
              "rollout": "attention rollout through every transformer block"}[model_spec(runs.network).cam_method]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>rectalfl explain: {e(site)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>What the networks look at: site {e(site)}, run {e(runs.run_id)}</h1>",
             "<div class='warn'><b>Site-local page.</b> It shows this hospital's images and patient identifiers "
             "and stays in the site's cache. rectalfl never sends it: no federation message exists for it.</div>",
             f"<p>Network <b>{e(runs.network)}</b> ({e(model_spec(runs.network).family or runs.network)}), "
             f"{method}; slices {runs.slice_size}&times;{runs.slice_size}. Grad-CAM explains the predicted class "
             "(good response when the probability is &ge; 0.5, poor otherwise); each map is scaled to [0, 1]. "
             "Cyan: the reference tumour outline. &laquo;in tumour&raquo;: share of the map inside it. "
             f"Made {e(datetime.now(UTC).isoformat(timespec='seconds'))}.</p>"]
    for key, items in cards.items():
        sub = rows[rows["backbone"] == key]
        inside = sub["cam_in_tumour"].mean()
        parts.append(f"<h2>{e(key)}</h2><p class='meta'>{len(sub)} patient(s); mean share of the map inside the "
                     f"tumour {'n/a' if np.isnan(inside) else f'{inside:.2f}'}</p><div class='grid'>")
        parts += items
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def explain_site(run_dir: Path, site_dir: Path, cache_dir: Path, *, config: Path | None = None, per_class: int = 3,
                 backbones: Sequence[str] | None = None, site: str | None = None, seed: int = 0,
                 out_dir: Path | None = None) -> ExplainResult:
    """Explain a sample of this site's good and poor responders with every backbone of a run.

    Parameters
    ----------
    run_dir : Path
        A finished run (``models/final.npz``, ``models/final.json``; ``config.yaml`` when present).
    site_dir, cache_dir : Path
        The site's data folder (``patients.csv`` for the labels) and its preprocessing cache.
    config : Path, optional
        Config for the label and split settings when the run folder has no ``config.yaml``.
    per_class : int
        Good and poor responders shown (each).
    backbones : sequence of str, optional
        Only these signature keys (default: all of the run's).
    site : str, optional
        The site's name in the consortium (default: the data folder's name); fixes its split.
    out_dir : Path, optional
        Default ``cache_dir/explain/<run-id>``.

    Returns
    -------
    ExplainResult
    """
    import numpy as np
    import pandas as pd
    import torch

    from client.preprocess import load_manifest, load_slice
    from client.train import assign_splits
    from shared.cohort import CohortError, load_patients
    from shared.models import model_spec

    runs = load_run_models(run_dir, config, backbones)
    cfg = runs.cfg
    site = site or Path(site_dir).resolve().name
    try:
        patients = load_patients(site_dir, cfg)
        manifest = load_manifest(cache_dir)
    except (CohortError, FileNotFoundError) as exc:
        raise ExplainError(str(exc)) from None
    labels = patients.set_index(patients["patient_id"].astype(str))["response"].dropna().astype(int)
    external = site in ({s.name for s in cfg.synth.sites if s.external} | set(cfg.federation.external_sites))
    splits = (pd.Series("external", index=labels.index) if external
              else assign_splits(labels, cfg.split.scheme, cfg.seed, site))
    ok = manifest[manifest["status"] == "ok"]
    keys = list(runs.models)
    available = {str(p) for p, g in ok.groupby("patient_id")
                 if {f"{t}_{s}" for t, s in zip(g["timepoint"], g["sequence"], strict=True)} & set(keys)}
    chosen = choose_patients(labels, splits, available, per_class, seed)
    if not chosen:
        raise ExplainError(f"site {site}: no labelled patient with a cached slice in {cache_dir} (run "
                           "`rectalfl site preprocess` first)")
    rows, cards = [], {}
    for key, model in runs.models.items():
        tp, seq = key.split("_", 1)
        have = set(ok[(ok["timepoint"] == tp) & (ok["sequence"] == seq)]["patient_id"].astype(str))
        ids = [p for p in chosen if p in have]
        if not ids:
            continue
        pairs = [load_slice(cache_dir, p, tp, seq) for p in ids]
        images = np.stack([im for im, _ in pairs])
        masks = np.stack([mk for _, mk in pairs])
        if images.shape[-1] != runs.slice_size:
            raise ExplainError(f"{cache_dir}: slices are {images.shape[-1]} px, run {runs.run_id}'s networks expect "
                               f"{runs.slice_size}: preprocess the site with the run's config "
                               "(preprocess.slice_size)")
        x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
        maps, prob = saliency(runs.network, model, x)
        share = mass_inside(maps, masks)
        cards[key] = []
        for i, pid in enumerate(ids):
            label = int(labels[pid])
            pred = "good" if prob[i] >= 0.5 else "poor"
            rows.append({"backbone": key, "patient_id": pid, "split": str(splits.get(pid, "")), "label": label,
                         "probability": float(prob[i]), "predicted": pred, "cam_in_tumour": float(share[i])})
            img = _png(images[i], masks[i], maps[i], f"{'Grad-CAM' if model_spec(runs.network).cam_method == 'gradcam' else 'rollout'} ({pred})")
            truth = "good" if label == 1 else "poor"
            cards[key].append(
                f"<div class='card'><img alt='{html.escape(pid)} {html.escape(key)}' src='data:image/png;base64,{img}'>"
                f"<div class='meta'><b>{html.escape(pid)}</b> ({html.escape(str(splits.get(pid, '')))}) &middot; "
                f"label <span class='{truth}'>{truth} responder</span> &middot; P(good) = {prob[i]:.2f} "
                f"(<span class='{pred}'>{pred}</span>) &middot; in tumour "
                f"{'n/a' if np.isnan(share[i]) else f'{share[i]:.2f}'}</div></div>")
    table = pd.DataFrame(rows, columns=["backbone", "patient_id", "split", "label", "probability", "predicted",
                                        "cam_in_tumour"])
    target = Path(out_dir) if out_dir else Path(cache_dir) / EXPLAIN_DIR / runs.run_id
    target.mkdir(parents=True, exist_ok=True)
    page = target / "index.html"
    page.write_text(_page(site, runs, table, cards), encoding="utf-8")
    summary = target / "summary.csv"
    table.to_csv(summary, index=False)
    logger.info("site-local explanation page: %s", page)
    return ExplainResult(page, summary, table)


# --------------------------------------------------------------------------- command


def explain(
    run: Annotated[Path, typer.Option("--run", help="A finished run folder (models/final.npz + final.json, "
                                                    "config.yaml), e.g. a copy the operator handed over.")],
    data: Annotated[Path, typer.Option("--data", help="This site's data folder (patients.csv for the labels).")],
    cache: Annotated[Path, typer.Option("--cache", help="This site's preprocessing cache (the slices).")],
    config: ConfigOpt = None,
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Good and poor responders shown, each.")] = 3,
    backbone: Annotated[list[str] | None, typer.Option("--backbone", help="Only this backbone (repeatable), "
                                                                          "e.g. pre_t2w.")] = None,
    site: Annotated[str | None, typer.Option(help="This site's name in the consortium (default: the data "
                                                  "folder's name).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the patient sample.")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Page folder (default CACHE/explain/<run-id>).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Grad-CAM / attention maps of the run's backbones on this site's own slices, as a site-local HTML page.

    Nothing is sent anywhere: the page (images, patient ids) stays in the site's cache.
    """
    try:
        res = explain_site(run, data, cache, config=config, per_class=per_class, backbones=backbone, site=site,
                           seed=seed, out_dir=out_dir)
    except (ExplainError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps({"page": str(res.page), "summary": str(res.summary), "maps": len(res.rows),
                                   "patients": int(res.rows["patient_id"].nunique())}))
        return
    console.print(f"{len(res.rows)} map(s) of {res.rows['patient_id'].nunique()} patient(s) -> [bold]{res.page}[/]")
    console.print("[dim]site-local: it shows images and patient ids; keep it at the hospital (nothing was sent)[/]")
