"""The run configuration: one pydantic schema for every YAML file in ``configs/``.

A wrong key or value fails before any work starts, with a message naming the key (as a dotted
path), the bad value and what is allowed::

    >>> from shared.config import load_config
    >>> cfg = load_config("configs/demo.yaml")
    >>> cfg.preprocess.slice_size
    64

Keys in YAML are snake_case. Every section has defaults, so a site file may hold only what it
changes (``data.sequences: [t2w]`` for a site with T2W only).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)

SEQUENCES: tuple[str, ...] = ("t2w", "dwi", "ce_t1w", "adc")
BACKBONES: dict[str, int | None] = {
    "densenet121": None, "densenet_tiny": None, "densenet169": None, "densenet169_tiny": None,
    "resnet18": None, "resnet_tiny": None, "resnet34": None, "resnet34_tiny": None, "resnet50": None,
    "resnet50_tiny": None, "seresnet50": None, "seresnet50_tiny": None, "seresnext50": None,
    "seresnext50_tiny": None, "efficientnet_b0": None, "efficientnet_b0_tiny": None, "convnext_t": None,
    "convnext_t_tiny": None, "vit": 16, "vit_tiny": 8, "swin_t": 32, "swin_t_tiny": 16,
}
"""Response backbones ``train.backbone`` may name, with the number ``preprocess.slice_size`` must be a multiple of
(a ViT's patch; Swin's patch x 8 for its three merges; None: any size). Kept here so that validating a config never imports PyTorch; a test checks it equals
``shared.models.available_models("classification")``."""
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
"""``train.device``: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (whether the device exists is checked where
training runs, since the server validates a config it never trains with)."""
TIMEPOINTS: tuple[str, ...] = ("pre", "post")

Sequence = Literal["t2w", "dwi", "ce_t1w", "adc"]
Timepoint = Literal["pre", "post"]


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or does not match the schema."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(_Section):
    """Which inputs a site must provide (the site data contract is in ``shared.cohort``)."""

    sequences: list[Sequence] = Field(default_factory=lambda: ["t2w", "dwi", "ce_t1w"], min_length=1)
    timepoints: list[Timepoint] = Field(default_factory=lambda: ["pre", "post"], min_length=1)
    label: Literal["response", "trg"] = "response"
    """Column used as the outcome. ``trg`` is mapped to response = TRG 0-1 (good) vs 2-3 (poor)."""
    require_masks: bool = False
    """If true, a volume without a reference mask is an error; otherwise a warning."""
    mask_fallback: list[Sequence] = Field(default_factory=lambda: ["t2w", "ce_t1w", "dwi", "adc"])
    """Order in which another sequence's mask of the same timepoint may serve a volume without its own."""

    @field_validator("sequences", "timepoints")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"entries must be unique, got {v}")
        return v


class CheckConfig(_Section):
    """Tolerances of the site integrity check (``rectalfl site check``)."""

    geometry_tolerance: float = Field(1e-3, gt=0, description="relative tolerance on spacing/origin/direction")
    spacing_min_mm: float = Field(0.1, gt=0)
    spacing_max_mm: float = Field(10.0, gt=0)
    min_mask_voxels: int = Field(10, ge=1)
    exclusion: Literal["patient", "volume"] = "patient"
    """What an error removes, in ``site check``, ``site preprocess`` and training alike: ``patient`` (default)
    excludes every volume of a patient with any error; ``volume`` excludes only the faulty volume (and the
    patient only for errors that are not about one volume, e.g. its label). See docs/site.md."""

    @model_validator(mode="after")
    def _range(self) -> CheckConfig:
        if self.spacing_min_mm >= self.spacing_max_mm:
            raise ValueError(
                f"spacing_min_mm ({self.spacing_min_mm}) must be below spacing_max_mm ({self.spacing_max_mm})"
            )
        return self


class N4Config(_Section):
    """N4 bias-field correction: fitted on a coarse grid, applied at full resolution.

    The fit grid is chosen in physical terms by default (``fit_spacing_mm``: about 7 mm, whatever the
    scanner's resolution: a 0.43 mm clinical T2W is fitted on 32 x 32 x 15); a config that sets
    ``shrink_factor`` without ``fit_spacing_mm`` uses the fixed factor instead (the demo does, for its
    small volumes). Defaults measured at 512 x 512 x 30 against a full-resolution fit: README,
    ``bench_n4`` and ``bench_preprocess`` rows.
    """

    enabled: bool = True
    shrink_factor: int = Field(4, ge=1, le=16, description="fit the bias field on an image shrunk by this factor")
    fit_spacing_mm: float | None = Field(7.0, gt=0, le=50)
    """Fit the bias field on a grid of about this spacing (mm); null: ``shrink_factor``."""
    iterations: list[int] = Field(default_factory=lambda: [20, 20, 20], min_length=1)
    """Maximum iterations per fitting level (one entry per level; each level doubles the B-spline mesh).
    Three levels are what match a full-resolution fit; more than ~20 iterations per level buy little."""
    convergence_threshold: float = Field(1e-4, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shrink_factor_alone_means_fixed_factor(cls, data: Any) -> Any:
        if isinstance(data, dict) and "shrink_factor" in data and "fit_spacing_mm" not in data:
            data = {**data, "fit_spacing_mm": None}
        return data


class DenoiseConfig(_Section):
    method: Literal["none", "curvature_flow", "anisotropic"] = "none"
    iterations: int = Field(5, ge=1, le=100)
    time_step: float = Field(0.0625, gt=0, le=0.125)


class PreprocessConfig(_Section):
    n4: N4Config = Field(default_factory=N4Config)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    bins: int = Field(64, ge=2, le=256, description="grey levels after discretisation (0-255 range kept)")
    spacing_mm: tuple[float, float, float] | None = None
    """Resample every volume to this (x, y, z) spacing before slice extraction; null keeps the native grid."""
    slice_size: int = Field(64, ge=16, le=1024)
    crop_margin: float = Field(0.5, ge=0.0, le=5.0)
    """Context around the tumour's bounding box, as a fraction of its larger side."""
    min_crop_mm: float = Field(40.0, gt=0)
    """The crop box is at least this wide (mm), so small tumours keep their surroundings."""
    workers: int = Field(1, ge=1, le=64)

    @field_validator("clip_percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(f"need 0 <= low < high <= 100, got {list(v)}")
        return v


class SiteSpec(_Section):
    """One synthetic site's size and character."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    patients: int = Field(ge=4, le=5000)
    prevalence: float = Field(0.35, gt=0.0, lt=1.0)
    """Fraction of good responders (TRG 0-1)."""
    scanner: Literal["siemens_like", "ge_like", "philips_like", "legacy_1p5t"] = "siemens_like"
    external: bool = False
    """An external site never trains; it only validates the final models."""


class SynthConfig(_Section):
    """The built-in synthetic multi-centre cohort (``rectalfl synth``)."""

    sites: list[SiteSpec] = Field(
        default_factory=lambda: [
            SiteSpec(name="site_a", patients=40, prevalence=0.40, scanner="siemens_like"),
            SiteSpec(name="site_b", patients=32, prevalence=0.30, scanner="ge_like"),
            SiteSpec(name="site_c", patients=24, prevalence=0.25, scanner="philips_like"),
            SiteSpec(name="external", patients=24, prevalence=0.35, scanner="legacy_1p5t", external=True),
        ],
        min_length=1,
    )
    shape: tuple[int, int, int] = (96, 96, 12)
    """Volume size (x, y, z) in voxels at the reference 0.7 x 0.7 x 4 mm grid."""
    fov_mm: tuple[float, float, float] | None = None
    """Field of view (x, y, z) of that reference grid in mm; null: ``shape`` x (0.7, 0.7, 4). A clinical
    small-FOV rectal T2W series is ``shape: [512, 512, 30]`` with ``fov_mm: [220, 220, 120]`` (0.43 x 0.43
    mm in plane on the Siemens-like profile; each scanner profile keeps its own spacing relative to the
    reference). The anatomy fills the field of view whatever the voxel count."""
    signal: float = Field(1.0, ge=0.0, le=5.0)
    """Strength of the response signal in the images (0 = images carry no information)."""
    missing_mask_fraction: float = Field(0.1, ge=0.0, le=1.0)
    second_rater_fraction: float = Field(0.3, ge=0.0, le=1.0)
    dicom_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of cases written as DICOM series folders instead of NIfTI."""
    include_adc: bool = False

    @field_validator("fov_mm")
    @classmethod
    def _positive_fov(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(10.0 <= float(x) <= 1000.0 for x in v):
            raise ValueError(f"fov_mm must be three lengths between 10 and 1000 mm, got {list(v)}")
        return v

    @field_validator("sites")
    @classmethod
    def _unique_names(cls, v: list[SiteSpec]) -> list[SiteSpec]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return v


class SplitConfig(_Section):
    scheme: Literal["8:1:1", "7:3"] = "8:1:1"
    """Patient-level stratified split per site: train/val/test 8:1:1, or train/test 7:3."""
    cv_folds: int = Field(5, ge=2, le=20)


class TrainConfig(_Section):
    backbone: str = "densenet121"
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=1, le=4096)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1)
    """Local work per round in SGD steps per backbone instead of ``local_epochs`` (epochs over fresh shuffles
    until this many steps): small sites otherwise make only 2-3 steps a round. Not with DP-SGD."""
    keep_optimizer_state: bool = False
    """Each site keeps its SGD momentum between rounds (in its cache, per run and backbone) instead of
    starting every round with a new optimiser. Not with DP-SGD."""
    class_weighting: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    hflip: bool = True
    device: str = "auto"
    """``auto`` picks CUDA when available, else CPU; or ``cpu``, ``cuda``, ``cuda:1``..."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Mixed precision on CUDA (``torch.autocast``): ``bf16``, ``fp16`` (with a gradient scaler), ``auto``
    (bf16 where the GPU supports it, else fp16) or ``fp32``. Off on CPU (always fp32 there). DP-SGD always
    trains in fp32: with ``privacy.dp`` a fixed ``bf16``/``fp16`` is a config error and ``auto`` means fp32."""
    channels_last: bool = False
    """CUDA only: 2-D networks and their batches in channels-last memory format (faster convolutions)."""
    compile: bool = False
    """CUDA only: train through ``torch.compile(network)`` (TorchInductor). The first round of each process
    pays the compilation (tens of seconds to minutes for DenseNet121); off on CPU; refused with DP-SGD
    (Opacus' per-sample hooks). See the README's bench_gpu row."""
    deterministic: bool = True
    """CUDA: deterministic cuDNN kernels (``cudnn.deterministic``, no autotuning), so the same seed gives
    the same weights on the same GPU and software. false is the fast mode: cuDNN autotuning
    (``cudnn.benchmark``) picks the fastest kernels, results may differ in the last bits run to run. CPU
    training is deterministic either way."""
    seed: int | None = Field(None, ge=0)
    """Seed of weight initialisation and local updates; null uses the run's ``seed`` (which also fixes
    the synthetic cohort and the splits), so repeated training on the same data is one key away."""
    pretrained_path: Path | None = None
    """Local weights the backbones start from instead of the seeded initialisation: a state dict of the
    registry network (``.pt``/``.pth``) or an ``.npz`` (a run's ``models/final.npz`` gives each backbone
    its own). Read where the initial model is made (the server); nothing is ever downloaded."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            close = difflib.get_close_matches(v, list(BACKBONES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown backbone{hint}; available: {', '.join(BACKBONES)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(DEVICE_PATTERN, v):
            raise ValueError("not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'")
        return v


class FederationConfig(_Section):
    mode: Literal["federated", "pooled", "local"] = "federated"
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedavgm"] = "fedavg"
    """fedavg; fedprox (``proximal_mu``); fedadam (server Adam: ``server_lr`` default 0.01, ``server_betas``,
    ``server_tau``); fedavgm (server momentum: ``server_momentum``, ``server_lr`` default 1.0). The two
    server optimisers step the weights only: normalisation buffers (BatchNorm running statistics) are
    averaged as FedAvg does."""
    rounds: int = Field(5, ge=1, le=10000)
    min_sites: int = Field(2, ge=1)
    proximal_mu: float = Field(0.01, ge=0)
    server_lr: float | None = Field(None, gt=0)
    """Server learning rate of fedadam (default 0.01) or fedavgm (default 1.0)."""
    norm_stats: Literal["global", "local"] = "global"
    """``local`` (SiloBN/FedBN-style): each site keeps its own BatchNorm running statistics between rounds
    (in its cache, per run) and normalises its images with them; the weights (affine parameters included)
    are federated as usual. A site without statistics of its own (an external site) re-estimates them
    on its own images, without labels, before computing signatures. ``global``: the averaged statistics.
    Federated runs only (the pooled and local baselines have one data set per model)."""
    server_momentum: float = Field(0.9, ge=0, lt=1)
    """fedavgm: momentum of the server's update (Hsu et al. 2019)."""
    server_betas: tuple[float, float] = (0.9, 0.99)
    """fedadam: Adam's beta_1, beta_2 on the server."""
    server_tau: float = Field(1e-3, gt=0)
    """fedadam: the adaptivity constant added to sqrt(v) (Reddi et al. 2021 use 1e-3; larger is closer to
    server SGD with momentum)."""
    external_sites: list[str] = Field(default_factory=list)
    """Sites that never train and only validate the final models (the synthetic cohort marks its own)."""
    round_timeout_s: float = Field(3600.0, gt=0)
    """How long the server waits for a round's replies before treating silent sites as dropped."""
    join_timeout_s: float = Field(600.0, gt=0)
    """Deployment: how long the server waits for the expected sites to connect before starting with those present."""
    max_update_norm_ratio: float = Field(10.0, gt=1)
    """A training reply whose update norm exceeds this many times the median of the round's updates is rejected."""
    secure_aggregation: bool = False
    """Model updates securely aggregated: the server reads only the weighted sum of the training sites'
    weights, never one site's (no per-site update screening, 2x upload, no dropout recovery; see
    docs/secure_aggregation.md). Needs every training site's roster and key, and at least 3 training sites."""

    @field_validator("server_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"Adam's betas are in [0, 1), got {list(v)}")
        return v


class PrivacyConfig(_Section):
    """Disclosure control of statistics, and differential privacy of every network a site trains.

    With ``dp: true`` each site trains with DP-SGD (Opacus: per-sample gradient clipping at
    ``max_grad_norm``, Gaussian noise, Poisson sampling), accounts its spend in its own privacy
    ledger (per run and stage; ``client.privacy_ledger``) and refuses a round that would exceed its
    own ``policy.epsilon_budget``. Exactly one of ``noise_multiplier`` (fixed noise) or
    ``target_epsilon`` (noise calibrated on site so that the planned ``federation.rounds`` spend
    this epsilon) is set. See docs/differential_privacy.md.
    """

    min_cell_count: int = Field(5, ge=1, description="disclosure control: smallest count a summary may describe")
    dp: bool = False
    """Train every network with DP-SGD on site (the networks' BatchNorm layers become GroupNorm)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Per-sample gradient clipping bound C (L2 norm over all parameters)."""
    noise_multiplier: float | None = Field(None, gt=0)
    """Gaussian noise std as a multiple of ``max_grad_norm`` (exclusive with ``target_epsilon``)."""
    target_epsilon: float | None = Field(None, gt=0)
    """Epsilon each site should reach after the planned rounds; the site calibrates the noise to it."""
    delta: float | Literal["auto"] = "auto"
    """``auto``: 1 / (10 n_train) per site (n_train: its training patients); or a number in (0, 1) that
    each site checks is below 1 / n_train."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus accountant: ``rdp`` (Renyi DP) or ``prv`` (privacy random variables; tighter, slower)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in (("dp_noise_multiplier", "noise_multiplier"), ("dp_max_grad_norm", "max_grad_norm")):
                if old in data:
                    raise ValueError(f"privacy.{old} is now privacy.{new}; rename the key")
        return data

    @field_validator("delta", mode="before")
    @classmethod
    def _delta(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("privacy.delta is missing: give 'auto' (1 / (10 n_train) per site) or a number in (0, 1)")
        if isinstance(v, str) and v != "auto":
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"privacy.delta must be 'auto' or a number in (0, 1), got {v!r}") from None
        if not isinstance(v, str) and not (isinstance(v, int | float) and 0.0 < float(v) < 1.0):
            raise ValueError(f"privacy.delta must be 'auto' or a number in (0, 1), got {v!r}")
        return v

    @model_validator(mode="after")
    def _dp_settings(self) -> PrivacyConfig:
        if not self.dp:
            return self
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError(
                f"privacy.noise_multiplier ({self.noise_multiplier:g}) and privacy.target_epsilon "
                f"({self.target_epsilon:g}) are both set: give one (a fixed noise, or the epsilon the noise is "
                "calibrated to), not both")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy.dp is true but neither privacy.noise_multiplier (e.g. 1.0) nor "
                             "privacy.target_epsilon (e.g. 8) is set: give one of them")
        return self

    @staticmethod
    def check_network(backbone: str, slice_size: int) -> None:
        """Raise ``ValueError`` naming the network when Opacus cannot make it DP-compatible.

        Builds the network once per process (``shared.models.dp_network_changes``).
        """
        from shared.models import dp_network_changes

        dp_network_changes(backbone, slice_size)


STAGES: tuple[str, ...] = ("describe", "train", "signatures", "stats", "fusion")
"""Message types (pipeline stages) a site may take part in; its policy may allow fewer."""


class PolicyConfig(_Section):
    """A hospital's own rules for what may leave it.

    Read by the site from its own config file (``rectalfl site join`` passes the file to the
    ClientApp through node config; a simulated site's comes from ``site_policies``), never from a
    server message: a server cannot lower a floor or widen an allow-list. A request outside the
    policy gets a refusal naming the rule, recorded in the site's ``audit.jsonl``.
    """

    min_cell_count: int = Field(5, ge=3)
    """Floor k: no count or sum the server can see (alone or by differencing answers) covers fewer patients."""
    stages: list[Literal["describe", "train", "signatures", "stats", "fusion"]] = Field(
        default_factory=lambda: list(STAGES))
    """Message types this site answers."""
    columns: list[str] | None = None
    """Columns statistics may be computed on: null = the run's signatures + the declared clinical
    predictors (``fusion.clinical_predictors`` of this file). Identifiers are never allowed."""
    query_budget: int = Field(20000, ge=1)
    """Most statistics answers (query rounds) this site gives one run."""
    release_site_figures: bool = False
    """Whether numbers about this site alone (per-site AUCs, per-site table rows) may be released."""
    roster: Path | None = None
    """Secure aggregation: the consortium's site public keys (a folder of <site>/site.pub, as `rectalfl
    certs add-site` writes); the site verifies every peer against it (no server-made sites). Statistics
    over several sites are always securely aggregated; without a roster a site answers only
    single-site (its own) queries."""
    role: Literal["train", "external"] | None = None
    """This site's role in the consortium agreement: ``external`` sites never train and their patients
    form the external cohort. Null accepts the role the server assigns (fixed for the run once given)."""
    identity_key: Path | None = None
    """Secure aggregation: this site's private key (default: deploy.site_key)."""
    epsilon_budget: float | None = Field(None, gt=0)
    """Differential privacy: the most epsilon this site spends on one run (null = no DP budget set)."""
    allowed_apps: list[str] = Field(default_factory=list)
    """Hashes of the Flower app versions this hospital agreed to run (empty = the installed rectalfl only)."""
    secure_updates: bool = False
    """Send model updates only securely aggregated (refuse a training round of a run without
    ``federation.secure_aggregation``)."""


class FusionConfig(_Section):
    """Fusion models (FDL, CR, CRD and the study's variants): federated RBF-SVMs, see shared.fusion."""

    enabled: bool = True
    variants: bool = True
    """Also fit the single-sequence, pairwise, pre-only, post-only and signatures+delta variants."""
    clinical_predictors: list[str] = Field(default_factory=lambda: [
        "age", "sex_male", "hb", "cea", "ca19_9", "pre_ld", "post_ld", "pre_mwt", "post_mwt", "pre_dtav",
        "post_dtav", "t_stage", "n_stage", "crm", "emvi"])
    """Candidate clinical-radiological predictors (columns of patients.csv; sex -> sex_male, T/N stage -> number)."""
    p_univariate: float = Field(0.10, gt=0, lt=1)
    p_multivariate: float = Field(0.05, gt=0, lt=1)
    C_grid: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0], min_length=1)
    gamma_factors: list[float] = Field(default_factory=lambda: [0.25, 1.0, 4.0], min_length=1)
    """RBF gamma candidates as multiples of 1 / n_inputs (scikit-learn's gamma="scale" on standardised inputs)."""
    n_components: int = Field(64, ge=8, le=1024)
    """Size of the RBF kernel map: Nystrom landmarks placed at the pooled marginal quantiles (cells of >= k
    patients), derived by every site from released histograms (``shared.fusion``)."""
    loss: Literal["squared_hinge", "huber_hinge"] = "squared_hinge"
    """squared_hinge: ~15 rounds. huber_hinge (closer to libsvm's hinge loss): ~80 rounds, see README."""
    huber_h: float = Field(0.1, gt=0, le=1)
    threshold: float = Field(0.5, gt=0, lt=1)
    """Probability at or above which a patient is predicted a good responder (accuracy, sensitivity, ...)."""
    pooled_reference: bool = True
    """Simulation only: also fit scikit-learn's SVC on the pooled rows, as the reference (never in deployment)."""


class DeployConfig(_Section):
    """Real consortium on Flower's Deployment Engine (``rectalfl server start`` / ``site join`` / ``run``)."""

    superlink: str = Field("127.0.0.1:9093", pattern=r"^[^\s:]+:\d{1,5}$")
    """host:port of the SuperLink: where the server listens and where sites connect."""
    certs_dir: Path = Path("certs")
    """Operator: the folder `rectalfl certs init` wrote (CA, server certificate, sites/<name>/site.pub)."""
    root_certificates: Path | None = None
    """Site: the consortium's ca.crt (given by the operator)."""
    site_key: Path | None = None
    """Site: this hospital's private key (certs/sites/<name>/site.key, given by the operator)."""
    site_name: str | None = None
    """Site: the name the server knows this hospital by (default: the data folder's name)."""
    node_port: int = Field(9094, ge=1, le=65535)
    """Site: local port of this SuperNode's runtime API (unique per SuperNode on one machine)."""
    flwr_home: Path = Path(".flwr")
    """Operator: Flower CLI home holding the SuperLink connection (config.toml)."""
    database: Path | None = None
    """Operator: the SuperLink's state file (registered site keys, runs), so they survive a restart;
    default <flwr_home>/superlink.db. ``:memory:`` keeps the state in memory only."""
    connection: str = Field("rectalfl", pattern=r"^[A-Za-z0-9_-]+$")
    """Operator: name of the SuperLink connection in flwr_home/config.toml."""
    sites: list[str] = Field(default_factory=list)
    """Operator: the consortium's sites (names as given to `rectalfl certs add-site`). `server start`
    registers exactly these keys and `rectalfl run` waits for these sites; a node whose registered
    key is not one of them, or whose self-reported name differs from its key's, is refused."""
    control_address: str = Field("127.0.0.1:9092", pattern=r"^[^\s:]+:\d{1,5}$")
    """Operator: where flower-superlink itself listens (Control API for `flwr` / `rectalfl run`, the
    ServerApp's runtime API, and the Fleet API behind the gateway on `superlink`). Loopback only:
    Flower 1.41 has no account authentication on the Control API."""
    site_flwr_home: Path | None = None
    """Site: Flower's working folder for this SuperNode (installed apps, state, runtime secret);
    default <cache_root>/flower, so nothing lands in the service user's home."""
    site_busy_poll_s: float | None = Field(0.2, ge=0.01, le=3.0)
    """Site: while a run is busy, how soon the SuperNode asks the SuperLink again after finding no
    message (Flower's own loop waits a fixed 3 s; back to 3 s after 2 idle minutes).
    ``null``: Flower's plain ``flower-supernode``. See ``client/supernode_poll.py``."""
    site_threads: int | None = Field(None, ge=1, le=1024)
    """Site: CPU threads each ClientApp's PyTorch / NumPy may use (sets ``OMP_NUM_THREADS`` for the app
    gate). Default: the libraries' own (every core), right for a machine that runs one site. Set it
    when several sites share one machine (the local consortium): with 4 sites on 2 cores each
    training process otherwise starts a thread per core and they compete for them (measured on the
    demo consortium: local training 24-32 s per site and round with the default, 4-6.5 s with 1)."""
    site_warm_start: bool = True
    """Site: the app gate keeps one process with the third-party libraries (Flower, NumPy, pandas,
    SciPy, PyTorch, MONAI) already imported and forks each message's ClientApp from it, instead of
    starting a new Python that imports them again (seconds per message). Every message still runs in
    its own new process, the app bundle is still checked before anything of it is imported, and no
    project code or site data is ever loaded into the kept process. ``false``: a fresh Python per
    message (Flower's own way). See ``client/app_gate.py``."""

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"site names must be unique, got {v}")
        return v

    @field_validator("control_address")
    @classmethod
    def _loopback(cls, v: str) -> str:
        import ipaddress

        host = v.rpartition(":")[0].strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{host} is not a loopback address: the Control API (run submission, node "
                             "registration) must be reachable from the operator's machine only, e.g. 127.0.0.1:9092")
        return v


class RectalFLConfig(_Section):
    """The whole configuration of a run, a site or a server."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(42, ge=0)
    data_root: Path = Path("data/synthetic")
    """Folder holding one sub-folder per site (the synthetic cohort, or a simulation's site dirs)."""
    cache_root: Path = Path("data/cache")
    runs_root: Path = Path("runs")
    data: DataConfig = Field(default_factory=DataConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """Site configs: this hospital's own disclosure policy (see :class:`PolicyConfig`)."""
    site_policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    """Simulation only: each simulated site's own policy, by site name (default: ``policy``)."""

    @model_validator(mode="after")
    def _precision_without_dp(self) -> RectalFLConfig:
        if self.privacy.dp and (self.train.local_steps is not None or self.train.keep_optimizer_state):
            raise ValueError("train.local_steps / train.keep_optimizer_state with privacy.dp: the privacy ledger plans "
                             "DP-SGD in epochs with a fresh optimiser each round; unset them or set privacy.dp: false")
        if self.privacy.dp and self.train.compile:
            raise ValueError("train.compile with privacy.dp: Opacus' per-sample gradient hooks do not go through "
                             "torch.compile; set train.compile: false")
        if self.privacy.dp and self.train.precision not in ("fp32", "auto"):
            raise ValueError(f"train.precision {self.train.precision!r} with privacy.dp: DP-SGD trains in fp32 (its "
                             "per-sample gradients and noise are calibrated in fp32); set train.precision: fp32")
        return self

    @model_validator(mode="after")
    def _backbone_fits_slices(self) -> RectalFLConfig:
        patch = BACKBONES.get(self.train.backbone)
        if patch and self.preprocess.slice_size % patch:
            raise ValueError(f"train.backbone {self.train.backbone!r} needs preprocess.slice_size to be a multiple of "
                             f"{patch} (its patch grid), got {self.preprocess.slice_size}")
        return self

    def digest(self) -> str:
        """Short hash of the resolved config (stored with models and the run record)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, source: str, overrides: Mapping[str, str] | None = None) -> str:
    """One line per bad setting: dotted key, value, what is allowed; a key set on the command line says so."""
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        value = e.get("input")
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _resolve_model(e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"not allowed; {msg.replace('Input should be', 'allowed values:')}"
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        origin = next((label for dotted, label in (overrides or {}).items()
                       if key == dotted or key.startswith(dotted + ".")), None)
        where = f" (set on the command line by {origin})" if origin else ""
        lines.append(f"  - {key} = {shown}{where}: {msg}" if e["loc"] else f"  - {msg}")
    return "\n".join(lines)


def _resolve_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = RectalFLConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return None
        model = sub
    return model


def parse_config(data: dict[str, Any] | None, source: str = "<config>", *,
                 overrides: Mapping[str, str] | None = None) -> RectalFLConfig:
    """Validate a mapping against the schema.

    Parameters
    ----------
    data : dict or None
        The settings (``None`` = all defaults).
    source : str
        What the settings came from, named in the error (a file name).
    overrides : mapping, optional
        Dotted keys that were set on the command line -> how the user set them (e.g.
        ``{"federation.mode": "--mode"}``); an error on one of them says so.

    Raises
    ------
    ConfigError
        Naming each bad key as a dotted path, its value and what is allowed.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return RectalFLConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, overrides)) from None


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the base constructor report it
            break
        if first is not None:
            raise _DuplicateKeyError(key, first, key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file strictly.

    Raises
    ------
    ConfigError
        The file is missing, unreadable, empty (or only comments), not valid YAML (the message names
        the file, line and column), gives a key twice in one section (naming both lines), or its top
        level is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "not found"
        raise ConfigError(f"config file {p} {what} (see configs/ for examples)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot be read as a text file ({exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise ConfigError(
            f"{p}:{exc.second.line + 1}: key {exc.key!r} is given twice in the same section (lines "
            f"{exc.first.line + 1} and {exc.second.line + 1}); YAML would silently keep only the second: "
            "delete one of them") from None
    except yaml.MarkedYAMLError as exc:
        ctx, prob = exc.context_mark, exc.problem_mark
        first = ctx or prob
        where = f"{p}:{first.line + 1}" if first is not None else str(p)
        parts = []
        if exc.context:
            parts.append(f"{exc.context}{f' (line {ctx.line + 1}, column {ctx.column + 1})' if ctx else ''}")
        if exc.problem:
            parts.append(f"{exc.problem}{f' at line {prob.line + 1}, column {prob.column + 1}' if prob else ''}")
        raise ConfigError(f"{where}: not valid YAML: {': '.join(parts) or type(exc).__name__}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty (no settings); write the keys you change (see configs/ for "
                          "examples), or leave out --config to use the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys (key: value lines), got "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                override_names: Mapping[str, str] | None = None) -> RectalFLConfig:
    """Read a YAML config file (or the defaults when ``path`` is None) and validate it.

    Parameters
    ----------
    path : str or Path, optional
        YAML file. ``None`` gives the schema defaults.
    overrides : dict, optional
        Dotted keys to set after reading, e.g. ``{"federation.rounds": 2}`` (command-line options).
    override_names : mapping, optional
        How the user set each override (``{"federation.rounds": "--rounds"}``), named in errors;
        default: the dotted key itself.

    Raises
    ------
    ConfigError
        See :func:`read_yaml` and :func:`parse_config`; an error caused by an override is named as
        a command-line setting, not attributed to the file.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
    names = {k: (override_names or {}).get(k, k) for k in (overrides or {})}
    for dotted, value in (overrides or {}).items():
        try:
            _set_dotted(data, dotted, value)
        except ConfigError as exc:
            raise ConfigError(f"command-line setting {names[dotted]}: {exc}") from None
    if names:
        source += f" with command-line setting(s) {', '.join(names.values())}"
    cfg = parse_config(data, source, overrides=names)
    if cfg.privacy.dp:  # differential privacy: can Opacus train this network? (builds it once per process)
        try:
            PrivacyConfig.check_network(cfg.train.backbone, cfg.preprocess.slice_size)
        except ValueError as exc:
            raise ConfigError(f"{source}: 1 invalid setting(s)\n  - train.backbone = "
                              f"{json.dumps(cfg.train.backbone)}: {exc}") from None
    return cfg


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
    node[parts[-1]] = value
