"""One exclusion rule for `site check`, `site preprocess` and training (issue 13, docs/site.md).

What the checker removes, preprocessing marks ``excluded`` (and does not compute) and training never
sees: with ``check.exclusion: patient`` (default) a patient with any error is out of every volume,
split and signature; with ``volume`` only the faulty volume is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import client.preprocess as pp
from client.algorithm import SiteAlgorithm
from client.preprocess import exclusion_summary, load_exclusions, load_manifest, preprocess_site
from shared.cohort import check_site

from .conftest import Site, build_site, site_config

PATIENTS = ("P001", "P002", "P003", "P007")


def rule(name: str):
    cfg = site_config()
    return cfg.model_copy(update={"check": cfg.check.model_copy(update={"exclusion": name}),
                                  "train": cfg.train.model_copy(update={"backbone": "densenet_tiny"})})


def nan_voxels(site: Site) -> None:
    p = site.path("P001", "pre", "dwi")
    img = sitk.ReadImage(str(p), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[2, 3:6, 3:6] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(p))


def four_d(site: Site) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 6, 16, 16), np.float32), isVector=False),
                    str(site.path("P001", "pre", "dwi")))


def empty_mask(site: Site) -> None:
    p = site.path("P001", "pre", "dwi", "mask")
    m = sitk.ReadImage(str(p))
    z = sitk.Image(m.GetSize(), m.GetPixelID())
    z.CopyInformation(m)
    sitk.WriteImage(z, str(p))


FAULTS = {"nan": (nan_voxels, "nonfinite_voxels"), "4d": (four_d, "not_3d"), "empty_mask": (empty_mask, "empty_mask")}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return build_site(tmp_path / "site", patients=PATIENTS)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_patient_rule_same_decision_in_check_preprocess_and_training(site: Site, tmp_path: Path, fault: str) -> None:
    # Prepare: one faulty volume of P001
    damage, code = FAULTS[fault]
    damage(site)
    cfg = rule("patient")
    cache = tmp_path / "cache"
    # Execute
    report = check_site(site.root, cfg)
    manifest = preprocess_site(site.root, cache, cfg)
    algo = SiteAlgorithm("s", site.root, cache, cfg)
    # Assert: the check excludes P001 ...
    assert report.excluded_patients == {"P001"} and code in report.codes("error")
    # ... preprocessing marks every P001 volume excluded, naming the rule and the issue, and computes none
    p1 = manifest[manifest["patient_id"] == "P001"]
    assert (p1["status"] == "excluded").all() and (p1["excluded_by"] == f"check:{code}").all()
    assert not list((cache / "slices").glob("P001/*.npz"))
    assert (manifest.loc[manifest["patient_id"] != "P001", "status"] == "ok").all()
    # ... the record says which rule removed what
    ex = load_exclusions(cache)
    assert ex[["patient_id", "scope", "rule", "code"]].drop_duplicates().values.tolist() == [
        ["P001", "patient", "patient", code]]
    assert exclusion_summary(cache) == {"rule": "patient", "patients": 1, "volumes": 0, "by_code": {code: 1}}
    # ... and training uses none of P001's volumes, nor P001 in any split
    assert "P001" not in algo.labels.index and "P001" not in algo.splits.index
    for key, data in algo.data.items():
        assert "P001" not in data.patient_ids, key
        assert len(data.patient_ids) == 3, key


def test_volume_rule_removes_only_the_faulty_volume(site: Site, tmp_path: Path) -> None:
    nan_voxels(site)
    cfg = rule("volume")
    cache = tmp_path / "cache"
    report = check_site(site.root, cfg)
    manifest = preprocess_site(site.root, cache, cfg)
    algo = SiteAlgorithm("s", site.root, cache, cfg)
    assert report.excluded_patients == set() and report.excluded_volumes == {("P001", "pre", "dwi")}
    row = manifest.set_index(["patient_id", "timepoint", "sequence"]).loc[("P001", "pre", "dwi")]
    assert row["status"] == "excluded" and row["excluded_by"] == "check:nonfinite_voxels"
    assert (manifest["status"] == "excluded").sum() == 1
    assert "P001" in algo.labels.index
    assert "P001" not in algo.data["pre_dwi"].patient_ids
    assert all("P001" in algo.data[k].patient_ids for k in ("pre_t2w", "post_t2w", "post_dwi"))
    assert exclusion_summary(cache)["volumes"] == 1


def test_preprocessing_failures_follow_the_rule(site: Site, tmp_path: Path, monkeypatch) -> None:
    """A volume the check passed but preprocessing could not use (here: N4 blows up) is treated alike."""
    real = pp.preprocess_volume

    def flaky(record, cfg, site_dir, **kw):
        if (record.patient_id, record.timepoint, record.sequence) == ("P002", "post", "t2w"):
            raise RuntimeError("N4 did not converge")
        return real(record, cfg, site_dir, **kw)

    monkeypatch.setattr(pp, "preprocess_volume", flaky)
    by_patient = preprocess_site(site.root, tmp_path / "c1", rule("patient"))
    by_volume = preprocess_site(site.root, tmp_path / "c2", rule("volume"))
    p2 = by_patient[by_patient["patient_id"] == "P002"].set_index(["timepoint", "sequence"])
    assert p2.loc[("post", "t2w"), "status"] == "error"
    others = p2.drop(index=("post", "t2w"))
    assert (others["status"] == "excluded").all()
    assert (others["excluded_by"] == "patient rule: post/t2w error").all()
    assert "P002" not in SiteAlgorithm("s", site.root, tmp_path / "c1", rule("patient")).labels.index
    assert (by_volume["status"] == "ok").sum() == len(by_volume) - 1
    ex = load_exclusions(tmp_path / "c2")
    assert ex.values.tolist()[0][:6] == ["P002", "post", "t2w", "volume", "volume", "preprocess_error"]


def test_the_check_behind_the_cache_is_reused_until_the_site_changes(site: Site, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import shared.cohort

    calls: list[Path] = []
    real = shared.cohort.check_site
    monkeypatch.setattr(shared.cohort, "check_site", lambda root, cfg, **kw: calls.append(root) or real(root, cfg, **kw))
    cache = tmp_path / "cache"
    preprocess_site(site.root, cache, rule("patient"))
    preprocess_site(site.root, cache, rule("patient"))
    assert len(calls) == 1 and (cache / "check.json").is_file()
    # switching the rule re-decides from the saved issues, without checking again
    nan_voxels(site)
    man = preprocess_site(site.root, cache, rule("volume"))
    assert len(calls) == 2  # the site changed: checked again
    assert (man["status"] == "excluded").sum() == 1
    man = preprocess_site(site.root, cache, rule("patient"))
    assert len(calls) == 2 and (man["status"] == "excluded").sum() == 4
    assert load_manifest(cache)["excluded_by"].str.startswith("check:").sum() == 4
