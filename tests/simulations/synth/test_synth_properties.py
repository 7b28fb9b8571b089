"""Statistical and physical properties of the synthetic cohort (labels, signal, bias, masks, profiles)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import SiteSpec, SynthConfig
from simulations.synth import (
    SCANNER_PROFILES,
    missing_mask_plan,
    render_patient,
    sample_patients,
    second_rater_mask,
    synth_volume,
    trg_thresholds,
)


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = score[positive.astype(bool)], score[~positive.astype(bool)]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


# --------------------------------------------------------------------------- labels and clinical table


@pytest.mark.parametrize("prevalence", [0.22, 0.40])
def test_realised_prevalence_matches_the_configured_one(prevalence: float) -> None:
    n = 2000
    df = sample_patients(SiteSpec(name="p", patients=10, prevalence=prevalence), n, np.random.default_rng(3))
    se = math.sqrt(prevalence * (1 - prevalence) / n)
    assert abs(df["response"].mean() - prevalence) < 3 * se
    assert set(df["trg"]) == {0, 1, 2, 3}
    assert (df["response"] == (df["trg"] <= 1)).all()


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 0.99))
def test_trg_thresholds_give_the_prevalence_exactly_in_expectation(p: float) -> None:
    c0, c1, c2 = trg_thresholds(p)
    assert c0 > c1 > c2
    assert 1 - 0.5 * (1 + math.erf(c1 / math.sqrt(2))) == pytest.approx(p, abs=1e-9)


def test_clinical_table_is_plausible_and_linked_to_response() -> None:
    df = sample_patients(SiteSpec(name="c", patients=10, prevalence=0.35), 2000, 11, with_latent=True)
    assert 56 < df["age"].mean() < 60 and 9 < df["age"].std() < 13
    assert 0.61 < (df["sex"] == "M").mean() < 0.69
    assert 126 < df["hb"].mean() < 136
    assert df["cea"].min() > 0 and df["cea"].median() < df["cea"].mean()  # right-skewed (lognormal)
    assert df["ca19_9"].min() > 0 and df["ca19_9"].median() < df["ca19_9"].mean()
    assert (df["post_ld"] <= df["pre_ld"] * 1.16).all() and (df["post_mwt"] >= 3).all()
    good, poor = df[df["response"] == 1], df[df["response"] == 0]
    assert good["post_mwt"].mean() < poor["post_mwt"].mean() - 2
    assert (good["post_ld"] / good["pre_ld"]).mean() < (poor["post_ld"] / poor["pre_ld"]).mean() - 0.15
    assert good["crm"].mean() < poor["crm"].mean() and good["emvi"].mean() < poor["emvi"].mean()
    assert good["recurrence"].mean() < poor["recurrence"].mean()
    assert df["rfs_months"].max() <= 60 and (df.loc[df["recurrence"] == 0, "rfs_months"] > 0).all()
    assert abs(np.corrcoef(df["age"], df["latent_r"])[0, 1]) < 0.1  # noise columns are noise
    assert sample_patients(SiteSpec(name="c", patients=10), 50, 11).equals(
        sample_patients(SiteSpec(name="c", patients=10), 50, 11))


def test_sample_patients_is_the_cohorts_clinical_table(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, _ = tiny_cohort
    spec = tiny_cfg.sites[0]
    written = pd.read_csv(root / spec.name / "patients.csv")
    drawn = sample_patients(spec, rng=7)
    pd.testing.assert_frame_equal(written, drawn, check_dtype=False)


# --------------------------------------------------------------------------- the response signal in the images


def _post_features(signal: float, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cfg = SynthConfig(shape=(48, 48, 8), signal=signal)
    spec = SiteSpec(name="sig", patients=n, prevalence=0.5, scanner="siemens_like")
    t2, vol, dwi, resp = [], [], [], []
    for i in range(n):
        pv = render_patient(cfg, spec, 5, i, sequences=("t2w", "dwi"), timepoints=("post",))
        v, d = pv.volumes[("post", "t2w")], pv.volumes[("post", "dwi")]
        t2.append(v.image[v.mask].mean())
        vol.append(v.mask.sum())
        dwi.append(d.image[d.mask].mean())
        resp.append(pv.row["response"])
    return np.array(t2), np.array(vol), np.array(dwi), np.array(resp)


def test_signal_zero_images_carry_no_response_information() -> None:
    t2, vol, dwi, resp = _post_features(0.0)
    assert 15 < resp.sum() < 45
    for feature in (t2, vol, dwi):
        assert abs(_auc(-feature, resp) - 0.5) < 0.2


def test_good_responders_are_darker_on_post_t2w_and_smaller() -> None:
    t2, vol, dwi, resp = _post_features(1.0)
    g, p = resp == 1, resp == 0
    assert _auc(-t2, resp) > 0.75  # lower post-T2W tumour intensity (fibrosis)
    assert t2[g].mean() < 0.85 * t2[p].mean()
    assert _auc(-vol, resp) > 0.65 and vol[g].mean() < 0.7 * vol[p].mean()
    assert _auc(-dwi, resp) > 0.75  # restricted diffusion lost


def test_every_rendered_mask_has_at_least_ten_voxels_even_for_complete_responders() -> None:
    cfg = SynthConfig(shape=(32, 32, 6), signal=5.0)
    spec = SiteSpec(name="cr", patients=20, prevalence=0.9, scanner="philips_like")
    for i in range(12):
        pv = render_patient(cfg, spec, 1, i)
        for vol in pv.volumes.values():
            assert vol.mask.sum() >= 10


# --------------------------------------------------------------------------- bias field and noise


@pytest.mark.parametrize("scanner", sorted(SCANNER_PROFILES))
def test_true_bias_field_is_smooth_with_the_configured_strength(scanner: str) -> None:
    img, bias, mask = synth_volume("t2w", scanner=scanner, shape=(48, 48, 8), seed=4, return_bias=True,
                                   return_mask=True)
    assert bias.GetSize() == img.GetSize() and bias.GetOrigin() == img.GetOrigin()
    assert sitk.GetArrayFromImage(mask).sum() >= 10
    logb = np.log(sitk.GetArrayFromImage(bias).astype(np.float64))
    assert np.abs(logb).max() == pytest.approx(SCANNER_PROFILES[scanner].bias_strength, rel=1e-4)
    # smooth: a quadratic polynomial of the voxel indices reproduces it
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in logb.shape], indexing="ij")
    basis = np.stack([np.ones_like(i), i, j, k, i * i, j * j, k * k, i * j, i * k, j * k], -1).reshape(-1, 10)
    coef, *_ = np.linalg.lstsq(basis, logb.ravel(), rcond=None)
    assert np.abs(basis @ coef - logb.ravel()).max() < 1e-5
    assert np.abs(np.diff(logb, axis=2)).max() < 0.1 * SCANNER_PROFILES[scanner].bias_strength


def test_bias_field_multiplies_the_image() -> None:
    a, bias_a = synth_volume("t2w", scanner="legacy_1p5t", seed=2, shape=(40, 40, 6), return_bias=True)
    flat = synth_volume("t2w", scanner="legacy_1p5t", seed=2, shape=(40, 40, 6), bias_strength=0.0)
    ratio = sitk.GetArrayFromImage(a).astype(float) / np.maximum(sitk.GetArrayFromImage(flat), 1)
    b = sitk.GetArrayFromImage(bias_a)
    body = sitk.GetArrayFromImage(flat) > 200  # bright tissue: noise small relative to signal
    assert np.median(np.abs(ratio[body] - b[body])) < 0.05
    _, flat_bias = synth_volume("t2w", seed=2, shape=(40, 40, 6), bias_strength=0.0, return_bias=True)
    assert np.all(sitk.GetArrayFromImage(flat_bias) == 1.0)


def test_background_noise_is_rician() -> None:
    prof = SCANNER_PROFILES["ge_like"]
    img = synth_volume("t2w", scanner="ge_like", shape=(64, 64, 6), seed=1, bias_strength=0.0)
    arr = sitk.GetArrayFromImage(img).astype(float)
    corner = arr[:, :6, :6].ravel()  # air outside the body
    sigma = prof.noise * prof.scale["t2w"]
    offset = prof.offset
    # magnitude of (offset + complex Gaussian): mean ~ sqrt(offset^2 + 2 sigma^2) when offset ~ sigma
    assert corner.min() >= 0
    assert 0.7 * math.hypot(offset, sigma) < corner.mean() < 1.5 * math.hypot(offset, 2 * sigma)


# --------------------------------------------------------------------------- masks: missing, second rater


@pytest.mark.parametrize("p", [0.1, 0.3, 0.6])
def test_missing_mask_plan_honours_the_fraction_and_keeps_one_mask(p: float) -> None:
    rng = np.random.default_rng(0)
    seqs = ["t2w", "dwi", "ce_t1w"]
    draws = [missing_mask_plan(rng, seqs, p) for _ in range(20000)]
    frac = np.mean([len(d) for d in draws]) / 3
    assert frac == pytest.approx(p, abs=0.01)
    whole = np.mean([len(d) == 3 for d in draws])
    assert whole == pytest.approx(p**3, abs=0.01)  # mask-less timepoints only by the p**n draw
    assert all(len(d) < 3 or d == set(seqs) for d in draws)
    assert missing_mask_plan(np.random.default_rng(5), ["adc"], 0.99) in ({"adc"}, set())
    assert missing_mask_plan(rng, seqs, 0.0) == set() and missing_mask_plan(rng, seqs, 1.0) == set(seqs)


def test_cohort_missing_mask_fraction_is_honoured_approximately(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, _ = tiny_cohort
    n_vol = sum(s.patients for s in tiny_cfg.sites) * 2 * 4
    n_masks = len(list(root.glob("*/masks/*/*/*.nii.gz")))
    frac = 1 - n_masks / n_vol
    se = math.sqrt(0.25 * 0.75 / n_vol)
    assert abs(frac - 0.25) < 4 * se  # per (patient, timepoint) draws are correlated: a loose bound


def test_second_rater_dice_is_plausible(tiny_cohort) -> None:
    root, _ = tiny_cohort
    dices = []
    for f in root.glob("*/masks_rater2/*/*/*.nii.gz"):
        site = f.relative_to(root).parts[0]
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(root / site / "masks" / f.relative_to(root / site / "masks_rater2"))))
        r2 = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        assert r2.sum() >= 10
        dices.append(2 * (ref & r2).sum() / (ref.sum() + r2.sum()))
    assert len(dices) > 10
    assert 0.65 < min(dices) and max(dices) < 0.95 and 0.75 <= np.median(dices) <= 0.9
    n_rater2_patients = len({f.parts[-3] for f in root.glob("*/masks_rater2/*/*/*.nii.gz")})
    assert n_rater2_patients == 6  # round(0.5 * 6) per site


def test_second_rater_mask_on_a_large_mask() -> None:
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:8, :40, :40]
    mask = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64) & (zz > 1) & (zz < 7)
    for _ in range(20):
        r2 = second_rater_mask(mask, rng)
        d = 2 * (mask & r2).sum() / (mask.sum() + r2.sum())
        assert 0.74 < d < 0.91


# --------------------------------------------------------------------------- scanner profiles make sites non-IID


def test_sites_differ_by_scanner_grid_and_intensity() -> None:
    stats = {}
    for name, prof in SCANNER_PROFILES.items():
        img = synth_volume("t2w", scanner=name, shape=(32, 32, 6), seed=0)
        assert img.GetSpacing() == pytest.approx((prof.inplane_mm, prof.inplane_mm, prof.slice_mm))
        assert 0.6 <= prof.inplane_mm <= 0.9 and 3.0 <= prof.slice_mm <= 5.0
        assert img.GetPixelID() == sitk.sitkInt16
        stats[name] = float(np.percentile(sitk.GetArrayFromImage(img), 95))
    assert max(stats.values()) > 3 * min(stats.values())  # intensity scales differ between vendors


def test_synth_volume_sequences_have_the_expected_tumour_contrast(tmp_path: Path) -> None:
    means = {}
    for seq in ("t2w", "dwi", "ce_t1w", "adc"):
        img, mask = synth_volume(seq, shape=(48, 48, 8), seed=9, signal=0.0, bias_strength=0.0, return_mask=True)
        a, m = sitk.GetArrayFromImage(img).astype(float), sitk.GetArrayFromImage(mask).astype(bool)
        means[seq] = (a[m].mean(), np.percentile(a[a > 0], 50))
    assert means["dwi"][0] > 2 * means["dwi"][1]  # restricted diffusion: tumour bright on DWI
    assert means["adc"][0] < 1200  # and dark on ADC (1e-6 mm^2/s)
    assert means["ce_t1w"][0] > means["ce_t1w"][1]  # enhancing


def test_fov_mm_writes_clinical_sizes_of_the_same_scene() -> None:
    """``fov_mm``: more voxels over the same field of view image the same anatomy (finer spacing)."""
    spec = SiteSpec(name="s", patients=4, scanner="siemens_like")
    prof = SCANNER_PROFILES["siemens_like"]
    coarse = SynthConfig(sites=[spec], shape=(48, 48, 8))  # default field of view: 33.6 x 33.6 x 32 mm
    fine = SynthConfig(sites=[spec], shape=(96, 96, 8), fov_mm=(33.6, 33.6, 32.0))
    vols = [render_patient(c, spec, 7, 0, sequences=("t2w",), timepoints=("pre",)).volumes[("pre", "t2w")]
            for c in (coarse, fine)]
    a, b = (v.image_sitk() for v in vols)
    assert a.GetSpacing() == pytest.approx((prof.inplane_mm, prof.inplane_mm, prof.slice_mm))  # default: unscaled
    assert b.GetSize() == (96, 96, 8)
    assert b.GetSpacing() == pytest.approx((prof.inplane_mm / 2, prof.inplane_mm / 2, prof.slice_mm))
    # the same tumour in millimetres: volume within 15 %, centroid within one coarse voxel
    mm3 = [float(v.mask.sum()) * float(np.prod(img.GetSpacing())) for v, img in zip(vols, (a, b), strict=True)]
    assert mm3[1] == pytest.approx(mm3[0], rel=0.15)
    cents = []
    for v, img in zip(vols, (a, b), strict=True):
        idx = np.argwhere(v.mask).mean(0)[::-1]  # (x, y, z) continuous index
        cents.append(np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(i) for i in idx])))
    assert np.linalg.norm(cents[0] - cents[1]) < prof.inplane_mm * 1.5
    # a clinical series: 512 x 512 over 220 mm is 0.43 mm in plane on this profile
    clinical = SynthConfig(sites=[spec], shape=(512, 512, 30), fov_mm=(220.0, 220.0, 120.0))
    from simulations.synth_render import spacing_scale

    assert prof.inplane_mm * spacing_scale(clinical.shape, clinical.fov_mm)[0] == pytest.approx(0.43, abs=0.005)


def test_fov_mm_is_validated_and_absent_from_old_cohort_parameters() -> None:
    from simulations.synth import _params

    with pytest.raises(ValueError, match="fov_mm"):
        SynthConfig(fov_mm=(0.0, 220.0, 120.0))
    assert "fov_mm" not in _params(SynthConfig(), 0)["synth"]  # cohorts made before the option stay reusable
    assert _params(SynthConfig(fov_mm=(220, 220, 120)), 0)["synth"]["fov_mm"] == [220.0, 220.0, 120.0]
