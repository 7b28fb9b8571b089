"""Latent responsiveness, TRG and the clinical-radiological table of the synthetic cohort.

Every patient gets a latent responsiveness ``r ~ N(0, 1)``. It alone decides the tumour regression
grade (TRG, 0 = complete response ... 3 = poor response; good response = TRG 0-1) through
thresholds chosen per site from the site's ``prevalence``; it also drives the images (see
``simulations.synth_render``) and, with fixed strengths that do not depend on ``signal``, a few
clinical columns (post-treatment tumour length and wall thickness, CRM, EMVI, T stage, CEA).

Random streams
--------------
Each patient's draws come from named, independent streams seeded by
``SeedSequence(seed, spawn_key=(site_key, index, stream_key))`` (:func:`patient_rng`), so a patient
is the same whatever the order, the number of workers or the set of sequences rendered.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from shared.config import SiteSpec

__all__ = [
    "CSV_COLUMNS",
    "PatientLatent",
    "patient_id",
    "patient_rng",
    "sample_clinical",
    "sample_latent",
    "sample_patients",
    "trg_thresholds",
]

CSV_COLUMNS: tuple[str, ...] = (
    "patient_id", "trg", "response", "age", "sex", "hb", "cea", "ca19_9", "pre_ld", "post_ld",
    "pre_mwt", "post_mwt", "pre_dtav", "post_dtav", "t_stage", "n_stage", "crm", "emvi",
    "rfs_months", "recurrence",
)
"""Columns of ``patients.csv``, in order."""

TRG0_SHARE_OF_GOOD = 0.35
"""Share of good responders (TRG 0-1) that are complete responders (TRG 0)."""
TRG3_SHARE_OF_POOR = 0.40
"""Share of poor responders (TRG 2-3) that have TRG 3."""
FOLLOW_UP_MONTHS = 60.0
"""Administrative censoring of recurrence-free survival."""

_NORMAL = NormalDist()


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def patient_id(site_name: str, index: int) -> str:
    """Site-prefixed patient id, unique across sites: ``<site>-<index+1 as 4 digits>``.

    >>> patient_id("site_a", 0)
    'site_a-0001'
    """
    return f"{site_name}-{index + 1:04d}"


def patient_rng(seed: int, site_name: str, index: int, stream: str) -> np.random.Generator:
    """The independent random stream ``stream`` of patient ``index`` of site ``site_name``.

    Parameters
    ----------
    seed : int
        Cohort seed.
    site_name : str
        Site name (hashed with CRC-32, so the stream does not depend on the site's list position).
    index : int
        0-based patient index within the site.
    stream : str
        Purpose of the draws (``"latent"``, ``"clinical"``, ``"anatomy"``, ``"noise-pre-t2w"``...).
    """
    ss = np.random.SeedSequence(int(seed), spawn_key=(_key(site_name), int(index), _key(stream)))
    return np.random.Generator(np.random.PCG64(ss))


def trg_thresholds(prevalence: float) -> tuple[float, float, float]:
    """Cut points ``(c0, c1, c2)`` on the latent ``r``: TRG 0 if r > c0, 1 if c1 < r <= c0, 2 if c2 < r <= c1, else 3.

    ``P(r > c1) = prevalence`` so the expected fraction of good responders (TRG 0-1) is the site's
    prevalence; :data:`TRG0_SHARE_OF_GOOD` of them are TRG 0 and :data:`TRG3_SHARE_OF_POOR` of the
    poor responders are TRG 3.
    """
    p = float(prevalence)
    if not 0.0 < p < 1.0:
        raise ValueError(f"prevalence must be in (0, 1), got {p}")
    c1 = _NORMAL.inv_cdf(1.0 - p)
    c0 = _NORMAL.inv_cdf(1.0 - p * TRG0_SHARE_OF_GOOD)
    c2 = _NORMAL.inv_cdf((1.0 - p) * TRG3_SHARE_OF_POOR)
    return c0, c1, c2


@dataclass(frozen=True)
class PatientLatent:
    """Hidden per-patient quantities (never written to disk).

    Attributes
    ----------
    r : float
        Latent responsiveness, N(0, 1); higher = better response.
    trg : int
        Tumour regression grade 0-3 from ``r`` and the site thresholds.
    response : int
        1 if TRG 0-1 (good response), else 0.
    size_z : float
        Pre-treatment tumour size score, N(0, 1), independent of ``r``.
    eps : tuple of float
        Independent N(0, 1) nuisance draws for the image effects (shrinkage, fibrosis, DWI loss,
        texture, node shrinkage, spare).
    """

    r: float
    trg: int
    response: int
    size_z: float
    eps: tuple[float, ...]


def sample_latent(rng: np.random.Generator, prevalence: float) -> PatientLatent:
    """Draw one patient's latent responsiveness and its TRG (see :func:`trg_thresholds`)."""
    r = float(rng.standard_normal())
    size_z = float(rng.standard_normal())
    eps = tuple(float(e) for e in rng.standard_normal(6))
    c0, c1, c2 = trg_thresholds(prevalence)
    trg = 0 if r > c0 else 1 if r > c1 else 2 if r > c2 else 3
    return PatientLatent(r=r, trg=trg, response=int(trg <= 1), size_z=size_z, eps=eps)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sample_clinical(rng: np.random.Generator, latent: PatientLatent, pid: str) -> dict[str, object]:
    """One row of ``patients.csv`` (columns :data:`CSV_COLUMNS`).

    Distributions (in the spirit of a published cohort's Table 1): age N(58, 11) years; 65 % male;
    Hb N(136 if M else 122, 16) g/L; CEA lognormal (median 3.5 ng/mL, sigma 1.0, higher for poor
    responders); CA19-9 lognormal (median 12 U/mL, sigma 0.9, noise); T stage ~12/68/20 % T2/T3/T4
    and N stage ~30/45/25 % N0/N1/N2 (both more advanced for low ``r``); CRM and EMVI positive
    ~25 % / ~30 % (more for low ``r``); tumour length LD lognormal (median 45 mm, tied to the image
    tumour size); max wall thickness MWT N(15, 4) mm; distance to the anal verge DTAV N(7, 3) cm.
    Post-treatment LD and MWT shrink more for high ``r``. Recurrence-free survival is exponential
    (after a 1-month lag) with hazard 0.0035/month for good and 0.010/month for poor responders
    (x1.4 if CRM+), censored
    by loss to follow-up (exponential, mean 240 months) and administratively at 60 months.
    """
    r = latent.r
    age = int(np.clip(round(rng.normal(58.0, 11.0)), 22, 90))
    male = bool(rng.random() < 0.65)
    hb = float(np.clip(round(rng.normal(136.0 if male else 122.0, 16.0)), 70, 185))
    cea = float(np.clip(round(math.exp(rng.normal(math.log(3.5) - 0.25 * r, 1.0)), 2), 0.2, 2000.0))
    ca19_9 = float(np.clip(round(math.exp(rng.normal(math.log(12.0), 0.9)), 1), 0.6, 5000.0))
    u = -0.45 * r + rng.normal(0.0, 0.9)
    t_stage = "T2" if u < -1.18 else "T4" if u > 0.85 else "T3"
    v = -0.25 * r + rng.normal(0.0, 0.97)
    n_stage = "N0" if v < -0.524 else "N2" if v > 0.674 else "N1"
    t4 = t_stage == "T4"
    crm = int(rng.random() < _sigmoid(-1.35 - 0.7 * r + (0.8 if t4 else 0.0)))
    emvi = int(rng.random() < _sigmoid(-1.0 - 0.6 * r + (0.5 if t4 else 0.0)))
    pre_ld = float(np.clip(45.0 * math.exp(0.3 * latent.size_z + rng.normal(0.0, 0.1)), 12.0, 120.0))
    post_ld = max(pre_ld * float(np.clip(math.exp(-0.55 - 0.35 * r + rng.normal(0.0, 0.25)), 0.05, 1.15)), 3.0)
    pre_mwt = float(np.clip(rng.normal(15.0 + (2.0 if t4 else 0.0), 4.0), 6.0, 35.0))
    post_mwt = max(pre_mwt * float(np.clip(math.exp(-0.35 - 0.25 * r + rng.normal(0.0, 0.2)), 0.2, 1.2)), 3.0)
    pre_dtav = float(np.clip(rng.normal(7.0, 3.0), 0.5, 15.0))
    post_dtav = float(np.clip(pre_dtav + rng.normal(0.2 + 0.3 * max(r, 0.0), 0.4), 0.5, 16.0))
    hazard = (0.0035 if latent.response else 0.010) * (1.4 if crm else 1.0)
    t_event = 1.0 + float(rng.exponential(1.0 / hazard))  # recurrences are found at follow-up, not at once
    t_censor = min(FOLLOW_UP_MONTHS, float(rng.exponential(240.0)))
    recurrence = int(t_event <= t_censor)
    rfs = max(round(min(t_event, t_censor), 1), 0.5)
    return {
        "patient_id": pid, "trg": latent.trg, "response": latent.response, "age": age,
        "sex": "M" if male else "F", "hb": hb, "cea": cea, "ca19_9": ca19_9,
        "pre_ld": round(pre_ld, 1), "post_ld": round(post_ld, 1),
        "pre_mwt": round(pre_mwt, 1), "post_mwt": round(post_mwt, 1),
        "pre_dtav": round(pre_dtav, 1), "post_dtav": round(post_dtav, 1),
        "t_stage": t_stage, "n_stage": n_stage, "crm": crm, "emvi": emvi,
        "rfs_months": rfs, "recurrence": recurrence,
    }


def patient_record(seed: int, spec: SiteSpec, index: int) -> tuple[PatientLatent, dict[str, object]]:
    """The latent and the clinical row of one cohort patient (the same draws :func:`generate_cohort` makes)."""
    latent = sample_latent(patient_rng(seed, spec.name, index, "latent"), spec.prevalence)
    row = sample_clinical(patient_rng(seed, spec.name, index, "clinical"), latent, patient_id(spec.name, index))
    return latent, row


def sample_patients(spec: SiteSpec, n: int | None = None, rng: np.random.Generator | int | None = None,
                    *, with_latent: bool = False) -> pd.DataFrame:
    """The clinical table of ``n`` patients of a site, without images (fast; for checks and power studies).

    Parameters
    ----------
    spec : SiteSpec
        The site (name used for the ids and streams, prevalence for the TRG thresholds).
    n : int, optional
        Number of patients (default ``spec.patients``).
    rng : Generator or int, optional
        Source of the cohort seed (an int is used as the seed itself; default 0). With an int seed,
        patient ``i`` is exactly patient ``i`` of :func:`simulations.synth.generate_cohort` with that seed.
    with_latent : bool
        Add the hidden columns ``latent_r`` and ``size_z``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CSV_COLUMNS` (+ hidden ones), one row per patient.
    """
    n = spec.patients if n is None else int(n)
    if isinstance(rng, np.random.Generator):
        seed = int(rng.integers(0, 2**63 - 1))
    else:
        seed = 0 if rng is None else int(rng)
    rows = []
    for i in range(n):
        latent, row = patient_record(seed, spec, i)
        if with_latent:
            row = {**row, "latent_r": latent.r, "size_z": latent.size_z}
        rows.append(row)
    cols = list(CSV_COLUMNS) + (["latent_r", "size_z"] if with_latent else [])
    return pd.DataFrame(rows, columns=cols)


def latent_as_dict(latent: PatientLatent) -> dict[str, object]:
    """The latent as a plain dict (for logs and debugging)."""
    return asdict(latent)
