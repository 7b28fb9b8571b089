"""The written cohort: layout of the site data contract, geometry, DICOM, determinism, reuse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from shared.config import SiteSpec, SynthConfig
from simulations.synth import (
    CSV_COLUMNS,
    CohortExistsError,
    generate_cohort,
    load_cohort_manifest,
    read_dicom_series,
    render_patient,
    true_bias_field,
    write_dicom_series,
)

SEQS = ("t2w", "dwi", "ce_t1w", "adc")
TPS = ("pre", "post")
SEED = 7  # the tiny cohort's seed (conftest)


def _read_image(path: Path) -> sitk.Image:
    return read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))


def _image_path(site: Path, pid: str, tp: str, seq: str) -> Path:
    nii = site / "images" / pid / tp / f"{seq}.nii.gz"
    return nii if nii.exists() else site / "images" / pid / tp / seq


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def _all_arrays(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        for kind in ("images", "masks", "masks_rater2"):
            for tp_dir in sorted((site / kind).glob("*/*")):
                for entry in sorted(tp_dir.iterdir()):
                    out[str(entry.relative_to(root))] = sitk.GetArrayFromImage(_read_image(entry))
    return out


# --------------------------------------------------------------------------- layout


def test_layout_is_exactly_the_site_data_contract(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, summary = tiny_cohort
    assert sorted(p.name for p in root.iterdir()) == sorted(["cohort.json", "site_a", "ext"])
    all_ids: list[str] = []
    for spec in tiny_cfg.sites:
        site = root / spec.name
        assert {p.name for p in site.iterdir()} <= {"patients.csv", "images", "masks", "masks_rater2"}
        assert {"patients.csv", "images", "masks"} <= {p.name for p in site.iterdir()}
        df = pd.read_csv(site / "patients.csv")
        assert list(df.columns) == list(CSV_COLUMNS)
        assert len(df) == spec.patients
        ids = df["patient_id"].tolist()
        all_ids += ids
        assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) and i.startswith(spec.name + "-") for i in ids)
        assert sorted(p.name for p in (site / "images").iterdir()) == sorted(ids)
        for pid in ids:
            assert sorted(p.name for p in (site / "images" / pid).iterdir()) == sorted(TPS)
            for tp in TPS:
                entries = {p.name for p in (site / "images" / pid / tp).iterdir()}
                assert len(entries) == len(SEQS)
                for seq in SEQS:
                    assert (f"{seq}.nii.gz" in entries) != (seq in entries)  # NIfTI xor DICOM folder
        for kind in ("masks", "masks_rater2"):
            if not (site / kind).exists():
                continue
            for f in (site / kind).rglob("*"):
                if f.is_file():
                    rel = f.relative_to(site / kind).parts
                    assert len(rel) == 3 and rel[0] in ids and rel[1] in TPS
                    assert rel[2] in {f"{s}.nii.gz" for s in SEQS}
        for f in (site / "masks_rater2").rglob("*.nii.gz"):  # a second rater only where a reference exists
            assert (site / "masks" / f.relative_to(site / "masks_rater2")).exists()
    assert len(set(all_ids)) == len(all_ids)  # unique across sites


def test_csv_values_follow_the_contract(tiny_cohort) -> None:
    root, _ = tiny_cohort
    for site in ("site_a", "ext"):
        df = pd.read_csv(root / site / "patients.csv")
        assert df["trg"].isin([0, 1, 2, 3]).all()
        assert (df["response"] == (df["trg"] <= 1).astype(int)).all()
        assert df["sex"].isin(["M", "F"]).all()
        assert df["t_stage"].isin(["T2", "T3", "T4"]).all() and df["n_stage"].isin(["N0", "N1", "N2"]).all()
        for col in ("crm", "emvi", "recurrence"):
            assert df[col].isin([0, 1]).all()
        assert ((df["rfs_months"] > 0) & (df["rfs_months"] <= 60)).all()
        assert (df.loc[df["recurrence"] == 0, "rfs_months"] <= 60).all()
        assert not df.isna().any().any()


def test_manifest_and_summary(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, summary = tiny_cohort
    m = load_cohort_manifest(root)
    assert m["seed"] == SEED and m["shape"] == [32, 32, 6] and m["signal"] == 1.0 and m["generator_version"]
    assert [s["name"] for s in m["sites"]] == ["site_a", "ext"]
    for entry, spec in zip(m["sites"], tiny_cfg.sites, strict=True):
        assert {"name", "external", "patients", "prevalence", "scanner"} <= set(entry)
        assert entry["external"] == spec.external and entry["patients"] == spec.patients
        assert entry["scanner"] == spec.scanner
        df = pd.read_csv(root / spec.name / "patients.csv")
        assert entry["prevalence"] == pytest.approx(df["response"].mean())
    assert summary.site_names == ["site_a", "ext"] and summary.external == {"site_a": False, "ext": True}
    assert summary.patients == {"site_a": 6, "ext": 6} and not summary.reused and summary.bytes > 0
    assert summary.prevalences["site_a"] == pytest.approx(m["sites"][0]["prevalence"])


def test_load_manifest_errors_clearly_when_absent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cohort.json"):
        load_cohort_manifest(tmp_path)


# --------------------------------------------------------------------------- geometry and masks


def test_masks_are_binary_non_empty_and_on_their_images_grid(tiny_cohort) -> None:
    root, _ = tiny_cohort
    n = 0
    for kind in ("masks", "masks_rater2"):
        for f in root.glob(f"*/{kind}/*/*/*.nii.gz"):
            site, _, pid, tp, name = f.relative_to(root).parts
            mask = sitk.ReadImage(str(f))
            assert mask.GetPixelID() == sitk.sitkUInt8
            arr = sitk.GetArrayFromImage(mask)
            assert set(np.unique(arr)) <= {0, 1} and arr.sum() >= 10
            img = _read_image(_image_path(root / site, pid, tp, name.removesuffix(".nii.gz")))
            assert _same_grid(mask, img), f
            n += 1
    assert n > 50


def test_dwi_grid_is_coarser_with_the_same_field_of_view(tiny_cohort) -> None:
    root, _ = tiny_cohort
    for site in ("site_a", "ext"):
        for pid_dir in sorted((root / site / "images").iterdir())[:3]:
            for tp in TPS:
                t2 = _read_image(_image_path(root / site, pid_dir.name, tp, "t2w"))
                ce = _read_image(_image_path(root / site, pid_dir.name, tp, "ce_t1w"))
                dwi = _read_image(_image_path(root / site, pid_dir.name, tp, "dwi"))
                adc = _read_image(_image_path(root / site, pid_dir.name, tp, "adc"))
                assert _same_grid(t2, ce) and _same_grid(dwi, adc)
                assert dwi.GetSize()[0] == t2.GetSize()[0] // 2 and dwi.GetSize()[2] == t2.GetSize()[2]
                assert dwi.GetSpacing()[0] == pytest.approx(2 * t2.GetSpacing()[0], rel=1e-4)
                fov_t2 = np.array(t2.GetSize()) * np.array(t2.GetSpacing())
                fov_dwi = np.array(dwi.GetSize()) * np.array(dwi.GetSpacing())
                assert np.allclose(fov_t2, fov_dwi, atol=1e-3)
                centre = [img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
                          for img in (t2, dwi)]
                assert np.allclose(centre[0], centre[1], atol=1e-3)
                assert np.allclose(t2.GetDirection(), dwi.GetDirection(), atol=1e-6)
                d = np.array(t2.GetDirection()).reshape(3, 3)  # slightly oblique, non-zero origin
                assert 1e-3 < np.abs(d - np.eye(3)).max() < 0.3
                assert np.linalg.norm(t2.GetOrigin()) > 1.0


def test_pre_and_post_masks_of_all_sequences_agree_in_physical_space(tiny_cfg: SynthConfig) -> None:
    pv = render_patient(tiny_cfg, tiny_cfg.sites[0], SEED, 1)
    for tp in TPS:
        t2 = pv.volumes[(tp, "t2w")]
        dwi = pv.volumes[(tp, "dwi")]
        moved = sitk.Resample(t2.mask_sitk(), dwi.mask_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor)
        a, b = sitk.GetArrayFromImage(moved).astype(bool), dwi.mask
        centroid = [np.argwhere(m).mean(0) for m in (a, b)]
        assert np.abs(centroid[0] - centroid[1]).max() < 1.5  # voxels of the coarse grid


# --------------------------------------------------------------------------- DICOM


def test_dicom_cases_round_trip_through_image_series_reader(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, _ = tiny_cohort
    folders = sorted(p for p in root.glob("*/images/*/*/*") if p.is_dir())
    assert folders, "the tiny cohort must have DICOM cases (dicom_fraction=0.34)"
    m = load_cohort_manifest(root)
    dicom_ids = {pid for s in m["sites"] for pid in s["dicom_patients"]}
    assert {p.parts[-3] for p in folders} == dicom_ids
    specs = {s.name: s for s in tiny_cfg.sites}
    for folder in folders[:4]:
        site, _, pid, tp, seq = folder.relative_to(root).parts
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
        assert len(names) == tiny_cfg.shape[2]
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        img = reader.Execute()
        ref = render_patient(tiny_cfg, specs[site], SEED, int(pid.rsplit("-", 1)[1]) - 1,
                             sequences=(seq,), timepoints=(tp,)).volumes[(tp, seq)]
        assert np.allclose(img.GetSpacing(), ref.grid.spacing, atol=1e-3)
        assert np.allclose(img.GetOrigin(), ref.grid.origin, atol=1e-3)
        assert np.allclose(img.GetDirection(), ref.grid.direction, atol=1e-3)
        assert np.array_equal(sitk.GetArrayFromImage(img), ref.image)
        r = sitk.ImageFileReader()
        r.SetFileName(names[0])
        r.ReadImageInformation()
        assert r.GetMetaData("0008|0060").strip() == "MR"
        assert r.GetMetaData("0010|0020").strip() == pid
        for tag in ("0020|000d", "0020|000e", "0020|0032", "0020|0037", "0028|0030", "0018|0050"):
            assert r.HasMetaDataKey(tag), tag


def test_write_dicom_series_round_trip_any_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 3000, size=(5, 7, 9)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.65, 0.8, 3.3))
    img.SetOrigin((-12.5, 40.25, -130.0))
    th = np.radians(7.0)
    rot = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    img.SetDirection(tuple(rot.ravel()))
    write_dicom_series(img, tmp_path / "s", patient_id="P1", study_uid="2.25.1", series_uid="2.25.2",
                       description="test")
    back = read_dicom_series(tmp_path / "s")
    assert _same_grid(back, img)
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)


# --------------------------------------------------------------------------- determinism


def test_written_volumes_are_exactly_the_rendered_ones(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, _ = tiny_cohort
    spec = tiny_cfg.sites[1]
    pv = render_patient(tiny_cfg, spec, SEED, 2)
    for (tp, seq), vol in pv.volumes.items():
        img = _read_image(_image_path(root / spec.name, pv.patient_id, tp, seq))
        assert np.array_equal(sitk.GetArrayFromImage(img), vol.image)
        mpath = root / spec.name / "masks" / pv.patient_id / tp / f"{seq}.nii.gz"
        if mpath.exists():
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(mpath))).astype(bool), vol.mask)
    df = pd.read_csv(root / spec.name / "patients.csv").set_index("patient_id")
    assert df.loc[pv.patient_id, "trg"] == pv.row["trg"]


def test_same_seed_is_identical_whatever_the_workers_other_seed_differs(tiny_cohort, tmp_path: Path,
                                                                       tiny_cfg: SynthConfig) -> None:
    root, _ = tiny_cohort
    again = generate_cohort(tiny_cfg, tmp_path / "w2", seed=SEED, workers=2)
    assert not again.reused
    for site in ("site_a", "ext"):
        assert (root / site / "patients.csv").read_bytes() == (tmp_path / "w2" / site / "patients.csv").read_bytes()
    a, b = _all_arrays(root), _all_arrays(tmp_path / "w2")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)

    cfg1 = SynthConfig(sites=[tiny_cfg.sites[0]], shape=(24, 24, 4))
    generate_cohort(cfg1, tmp_path / "s8", seed=8)
    generate_cohort(cfg1, tmp_path / "s9", seed=9)
    csv8 = (tmp_path / "s8" / "site_a" / "patients.csv").read_bytes()
    csv9 = (tmp_path / "s9" / "site_a" / "patients.csv").read_bytes()
    assert csv8 != csv9
    t8 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s8/site_a/images/site_a-0001/pre/t2w.nii.gz")))
    t9 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s9/site_a/images/site_a-0001/pre/t2w.nii.gz")))
    assert t8.shape == t9.shape and not np.array_equal(t8, t9)


def test_a_patient_does_not_depend_on_the_site_list_order(tiny_cfg: SynthConfig) -> None:
    a = render_patient(tiny_cfg, tiny_cfg.sites[1], SEED, 3, sequences=("t2w",))
    swapped = tiny_cfg.model_copy(update={"sites": list(reversed(tiny_cfg.sites))})
    b = render_patient(swapped, swapped.sites[0], SEED, 3, sequences=("t2w",))
    assert a.row == b.row and np.array_equal(a.volumes[("pre", "t2w")].image, b.volumes[("pre", "t2w")].image)
    full = render_patient(tiny_cfg, tiny_cfg.sites[1], SEED, 3)  # a subset renders the same arrays
    assert np.array_equal(full.volumes[("post", "t2w")].image, a.volumes[("post", "t2w")].image)


# --------------------------------------------------------------------------- reuse, overwrite, interruption


def _small() -> SynthConfig:
    return SynthConfig(sites=[SiteSpec(name="s1", patients=4, prevalence=0.5)], shape=(24, 24, 4),
                       dicom_fraction=0.0, second_rater_fraction=0.0, missing_mask_fraction=0.0)


def test_identical_cohort_is_reused_without_rewriting(tmp_path: Path) -> None:
    cfg = _small()
    first = generate_cohort(cfg, tmp_path, seed=1)
    csv = tmp_path / "s1" / "patients.csv"
    stamp = csv.stat().st_mtime_ns
    calls = []
    again = generate_cohort(cfg, tmp_path, seed=1, progress=lambda *a: calls.append(a))
    assert again.reused and again.seconds < 1.0 and csv.stat().st_mtime_ns == stamp
    assert again.sites == first.sites and calls == [(4, 4, "cohort reused")]


def test_different_parameters_raise_unless_overwrite(tmp_path: Path) -> None:
    cfg = _small()
    generate_cohort(cfg, tmp_path, seed=1)
    with pytest.raises(CohortExistsError, match="seed"):
        generate_cohort(cfg, tmp_path, seed=2)
    with pytest.raises(CohortExistsError, match="signal"):
        generate_cohort(cfg.model_copy(update={"signal": 0.0}), tmp_path, seed=1)
    renamed = cfg.model_copy(update={"sites": [SiteSpec(name="s2", patients=4)]})
    out = generate_cohort(renamed, tmp_path, seed=1, overwrite=True)
    assert not out.reused and load_cohort_manifest(tmp_path)["params"]["seed"] == 1
    assert not (tmp_path / "s1").exists() and (tmp_path / "s2" / "patients.csv").exists()


def test_foreign_folder_is_refused_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CohortExistsError, match="not empty"):
        generate_cohort(_small(), tmp_path, seed=1)
    generate_cohort(_small(), tmp_path, seed=1, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files are left alone
    assert (tmp_path / "cohort.json").exists()


def test_interrupted_generation_is_detected_and_redone(tmp_path: Path) -> None:
    def boom(done: int, total: int, label: str) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_cohort(_small(), tmp_path, seed=1, progress=boom)
    assert not (tmp_path / "cohort.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_cohort_manifest(tmp_path)
    out = generate_cohort(_small(), tmp_path, seed=1)  # no overwrite needed: it was ours
    assert not out.reused
    assert len(pd.read_csv(tmp_path / "s1" / "patients.csv")) == 4
    assert len(list((tmp_path / "s1" / "images").iterdir())) == 4
    assert json.loads((tmp_path / "cohort.json").read_text())["sites"][0]["patients"] == 4
    assert not list(tmp_path.glob(".synth-*"))


def test_true_bias_field_of_a_written_volume(tiny_cohort, tiny_cfg: SynthConfig) -> None:
    root, _ = tiny_cohort
    pid = "site_a-0002"
    bias = true_bias_field(tiny_cfg, SEED, "site_a", pid, "post", "t2w")
    img = _read_image(_image_path(root / "site_a", pid, "post", "t2w"))
    assert _same_grid(bias, img) and bias.GetPixelID() == sitk.sitkFloat32
    b = sitk.GetArrayFromImage(bias)
    assert np.abs(np.log(b)).max() == pytest.approx(0.20, abs=1e-4)  # siemens_like
    with pytest.raises(ValueError):
        true_bias_field(tiny_cfg, SEED, "site_a", "ext-0001", "pre", "t2w")


def test_summary_serialises_for_the_cli(tiny_cohort) -> None:
    import dataclasses

    _, summary = tiny_cohort
    info = json.loads(json.dumps(dataclasses.asdict(summary), default=str))
    assert [s["name"] for s in info["sites"]] == ["site_a", "ext"]
    assert {"external", "patients", "prevalence", "scanner"} <= set(info["sites"][0])


def test_render_patient_rejects_unknown_sequences(tiny_cfg: SynthConfig) -> None:
    with pytest.raises(ValueError, match="flair"):
        render_patient(tiny_cfg, tiny_cfg.sites[0], 1, 0, sequences=("flair",))
