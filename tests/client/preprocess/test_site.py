"""preprocess_site end to end: manifest, cache layout, errors, resumability, parallel workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import client.preprocess as pp
from client.preprocess import MANIFEST_COLUMNS, load_manifest, load_slice, load_slice_info, preprocess_site

from .conftest import PATIENTS, SEQUENCES, TIMEPOINTS, TUMOUR_Z, Site, build_site, site_config


def _own_failures(cfg):
    """These tests are about preprocessing's own failure handling: no site check in front of it (a check
    without findings) and the volume rule, so a failure removes only its volume (the exclusion rule
    itself is tested in tests/client/preprocess/test_exclusion_rule.py)."""
    return cfg.model_copy(update={"check": cfg.check.model_copy(update={"exclusion": "volume"})})


def _no_check(root: Path):
    from shared.cohort import CheckReport

    return CheckReport(Path(root), 0, 0, rule="volume")


def _arrays(cache: Path, manifest: pd.DataFrame) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    ok = manifest[manifest["status"] == "ok"]
    return {(r.patient_id, r.timepoint, r.sequence): load_slice(cache, r.patient_id, r.timepoint, r.sequence)
            for r in ok.itertuples()}


class Counter:
    """Wraps preprocess_volume and records which volumes were computed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self._orig = pp.preprocess_volume

    def __call__(self, record, cfg, site_dir, **kw):
        self.calls.append((record.patient_id, record.timepoint, record.sequence))
        return self._orig(record, cfg, site_dir, **kw)


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> Counter:
    c = Counter()
    monkeypatch.setattr(pp, "preprocess_volume", c)
    return c


def test_site_end_to_end_with_a_corrupt_file(tiny_site: Site, tmp_path: Path) -> None:
    bad = tiny_site.path("P007", "post", "dwi")
    bad.write_bytes(b"\x1f\x8b this is not an image")
    tiny_site.remove_mask("P001", "pre", "dwi")  # served by the t2w mask
    cfg = _own_failures(site_config())
    cache = tmp_path / "cache"
    seen: list[tuple[int, int, str]] = []
    manifest = preprocess_site(tiny_site.root, cache, cfg, progress=lambda d, t, label: seen.append((d, t, label)),
                               check=_no_check(tiny_site.root))

    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == len(PATIENTS) * len(TIMEPOINTS) * len(SEQUENCES) == 8
    assert [s[0] for s in seen] == list(range(1, 9)) and all(s[1] == 8 for s in seen)
    by_key = manifest.set_index(["patient_id", "timepoint", "sequence"])
    err = by_key.loc[("P007", "post", "dwi")]
    assert err["status"] == "error" and "images/P007/post/dwi.nii.gz" in err["error"]
    assert err["path"] == "" and err["slice_index"] == -1
    ok = manifest[manifest["status"] == "ok"]
    assert len(ok) == 7 and (ok["error"] == "").all()
    assert by_key.loc[("P001", "pre", "dwi"), "mask_source"] == "t2w"
    assert set(ok["mask_source"]) == {"own", "t2w"}
    for r in ok.itertuples():
        assert r.slice_index == TUMOUR_Z[r.patient_id][r.timepoint]
        assert r.path == f"slices/{r.patient_id}/{r.timepoint}_{r.sequence}.npz"
        img, mask = load_slice(cache, r.patient_id, r.timepoint, r.sequence)
        assert img.shape == mask.shape == (24, 24)
        assert img.dtype == np.uint8 and mask.dtype == np.uint8
        assert len(np.unique(img)) <= 32 and set(np.unique(mask)) <= {0, 1} and mask.sum() > 0
    info = load_slice_info(cache, "P001", "pre", "dwi")
    assert info["mask_source"] == "t2w" and info["source"] == "images/P001/pre/dwi.nii.gz"
    assert info["fingerprint"] == pp.config_fingerprint(cfg) and len(info["spacing"]) == 3
    sidecar = json.loads((cache / "slices/P007/post_dwi.error.json").read_text())
    assert sidecar["status"] == "error" and "dwi.nii.gz" in sidecar["error"]

    # the manifest on disk reads back identically (ids stay strings)
    back = load_manifest(cache)
    pd.testing.assert_frame_equal(back[list(MANIFEST_COLUMNS[:9])], manifest[list(MANIFEST_COLUMNS[:9])],
                                  check_dtype=False)
    assert back["patient_id"].tolist() == manifest["patient_id"].tolist()
    # no temporary files are left behind
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]


def test_no_mask_status_and_numeric_ids(tmp_path: Path) -> None:
    site = build_site(tmp_path / "site", patients=("007", "P001"))
    for seq in SEQUENCES:
        site.remove_mask("007", "post", seq)
    m = preprocess_site(site.root, tmp_path / "cache", _own_failures(site_config()), check=_no_check(site.root))
    nm = m[m["status"] == "no_mask"]
    assert sorted(nm["sequence"]) == ["dwi", "t2w"] and set(nm["patient_id"]) == {"007"}
    assert (nm["mask_source"] == "none").all() and nm["error"].str.contains("no mask").all()
    back = load_manifest(tmp_path / "cache")
    assert "007" in set(back["patient_id"])


def test_geometry_incompatible_fallback_is_an_error_row(tiny_site: Site, tmp_path: Path) -> None:
    import SimpleITK as sitk

    tiny_site.remove_mask("P007", "pre", "dwi")
    p = tiny_site.path("P007", "pre", "t2w", "mask")
    m = sitk.ReadImage(str(p))
    m.SetOrigin((300.0, 300.0, 0.0))
    sitk.WriteImage(m, str(p))
    man = preprocess_site(tiny_site.root, tmp_path / "cache", _own_failures(site_config()),
                          check=_no_check(tiny_site.root))
    row = man.set_index(["patient_id", "timepoint", "sequence"]).loc[("P007", "pre", "dwi")]
    assert row["status"] == "error" and "mask geometry incompatible" in row["error"]
    # its own t2w volume now has a mask that does not fit either: an error, not a crash
    assert man.set_index(["patient_id", "timepoint", "sequence"]).loc[("P007", "pre", "t2w"), "status"] == "error"
    assert (man["status"] == "ok").sum() == 6


def test_rerun_recomputes_only_the_deleted_volume(tiny_site: Site, tmp_path: Path, counter: Counter) -> None:
    cfg = site_config()
    cache = tmp_path / "cache"
    first = preprocess_site(tiny_site.root, cache, cfg)
    assert len(counter.calls) == 8
    (cache / "slices/P001/post_t2w.npz").unlink()
    counter.calls.clear()
    second = preprocess_site(tiny_site.root, cache, cfg)
    assert counter.calls == [("P001", "post", "t2w")]
    cols = ["patient_id", "timepoint", "sequence", "status", "slice_index", "tumour_area_px", "mask_source", "path"]
    pd.testing.assert_frame_equal(first[cols], second[cols])
    counter.calls.clear()
    preprocess_site(tiny_site.root, cache, cfg)
    assert counter.calls == []
    preprocess_site(tiny_site.root, cache, cfg, force=True)
    assert len(counter.calls) == 8


def test_changed_config_or_input_recomputes(tiny_site: Site, tmp_path: Path, counter: Counter) -> None:
    cache = tmp_path / "cache"
    preprocess_site(tiny_site.root, cache, site_config())
    counter.calls.clear()
    preprocess_site(tiny_site.root, cache, site_config(workers=3), workers=1)  # workers is not in the fingerprint
    assert counter.calls == []
    preprocess_site(tiny_site.root, cache, site_config(bins=16))
    assert len(counter.calls) == 8
    assert len(np.unique(load_slice(cache, "P001", "pre", "t2w")[0])) <= 16
    counter.calls.clear()
    # a re-exported image (new mtime) is recomputed, the rest reused
    p = tiny_site.path("P007", "pre", "dwi")
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    preprocess_site(tiny_site.root, cache, site_config(bins=16))
    assert counter.calls == [("P007", "pre", "dwi")]


def test_interrupted_run_keeps_finished_volumes_and_resumes(tiny_site: Site, tmp_path: Path,
                                                             counter: Counter) -> None:
    cfg = site_config()
    cache = tmp_path / "cache"

    def stop_after_3(done: int, total: int, label: str) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_site(tiny_site.root, cache, cfg, progress=stop_after_3)
    assert len(counter.calls) == 3
    assert len(list(cache.glob("slices/*/*.npz"))) == 3
    assert not (cache / "manifest.csv").exists()  # an incomplete cache has no manifest
    first_three = list(counter.calls)
    counter.calls.clear()
    man = preprocess_site(tiny_site.root, cache, cfg)
    assert len(counter.calls) == 5 and not set(counter.calls) & set(first_three)
    assert (man["status"] == "ok").all() and (cache / "manifest.csv").is_file()


def test_failures_are_persisted_and_reused(tiny_site: Site, tmp_path: Path, counter: Counter) -> None:
    tiny_site.path("P001", "pre", "t2w").write_bytes(b"garbage")
    cache = tmp_path / "cache"
    preprocess_site(tiny_site.root, cache, _own_failures(site_config()), check=_no_check(tiny_site.root))
    assert (cache / "slices/P001/pre_t2w.error.json").is_file()
    counter.calls.clear()
    man = preprocess_site(tiny_site.root, cache, _own_failures(site_config()), check=_no_check(tiny_site.root))
    assert counter.calls == []  # same inputs, same config: the recorded failure stands
    assert man.set_index(["patient_id", "timepoint", "sequence"]).loc[("P001", "pre", "t2w"), "status"] == "error"
    # fixing the file makes the next run retry it, and the stale error record goes
    time.sleep(0.01)
    build_site(tmp_path / "fresh")
    tiny_site.path("P001", "pre", "t2w").write_bytes((tmp_path / "fresh/images/P001/pre/t2w.nii.gz").read_bytes())
    man = preprocess_site(tiny_site.root, cache, _own_failures(site_config()), check=_no_check(tiny_site.root))
    assert counter.calls == [("P001", "pre", "t2w")]
    assert (man["status"] == "ok").all()
    assert not (cache / "slices/P001/pre_t2w.error.json").exists()


def test_two_workers_match_one_worker(tiny_site: Site, tmp_path: Path) -> None:
    tiny_site.path("P007", "post", "t2w").write_bytes(b"broken")
    cfg = _own_failures(site_config())
    one = preprocess_site(tiny_site.root, tmp_path / "c1", cfg, workers=1, check=_no_check(tiny_site.root))
    labels: list[str] = []
    two = preprocess_site(tiny_site.root, tmp_path / "c2", cfg, workers=2, progress=lambda d, t, s: labels.append(s),
                          check=_no_check(tiny_site.root))
    assert len(labels) == 8
    cols = [c for c in MANIFEST_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(one[cols], two[cols])
    a1, a2 = _arrays(tmp_path / "c1", one), _arrays(tmp_path / "c2", two)
    assert a1.keys() == a2.keys() and len(a1) == 7
    for k in a1:
        np.testing.assert_array_equal(a1[k][0], a2[k][0])
        np.testing.assert_array_equal(a1[k][1], a2[k][1])


def test_unusable_site_raises_cohort_error(tmp_path: Path) -> None:
    from shared.cohort import CohortError

    with pytest.raises(CohortError):
        preprocess_site(tmp_path / "nowhere", tmp_path / "cache", site_config())
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path / "cache")


def test_interrupted_parallel_run_keeps_finished_volumes(tiny_site: Site, tmp_path: Path) -> None:
    cfg = site_config()
    cache = tmp_path / "cache"

    def stop_after_2(done: int, total: int, label: str) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess_site(tiny_site.root, cache, cfg, workers=2, progress=stop_after_2)
    kept = len(list(cache.glob("slices/*/*.npz")))
    assert 2 <= kept < 8  # the reported ones and those in flight, not the cancelled rest
    assert not (cache / "manifest.csv").exists()
    seen: list[str] = []
    man = preprocess_site(tiny_site.root, cache, cfg, workers=2, progress=lambda d, t, s: seen.append(s))
    assert sum(s.endswith("(cached)") for s in seen) == kept
    assert (man["status"] == "ok").all() and len(man) == 8
