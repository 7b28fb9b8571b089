"""The loading API preprocessing imports: read_image, find_volume, load_patients, iter_volumes."""

from __future__ import annotations

import pandas as pd
import pytest
import SimpleITK as sitk

from shared.cohort import CohortError, find_volume, iter_volumes, load_patients, read_image

from .conftest import make_volume


def test_load_patients_derives_response_from_trg(site) -> None:
    # Prepare: a trg-only table with zero-padded ids
    (site.root / "patients.csv").write_text("patient_id,trg\n007,0\n008,1\n009,2\n010,3\n")
    # Execute
    table = load_patients(site.root, site.cfg)
    # Assert
    assert table["patient_id"].tolist() == ["007", "008", "009", "010"]
    assert table["response"].tolist() == [1, 1, 0, 0]
    assert str(table["response"].dtype) == "Int64"


def test_load_patients_label_trg_overrides_and_canonicalises(site, make_cfg) -> None:
    # Prepare
    (site.root / "patients.csv").write_text(
        "Patient ID,TRG,Response,Age,CEA,CRM,Sex\nP001,1,1,60,2.5,positive,male\nP002,3,0,abc,,no,F\n")
    cfg = make_cfg(data={"label": "trg"})
    # Execute
    table = load_patients(site.root, cfg).set_index("patient_id")
    # Assert: normalised column names, numeric clinical values (bad -> NaN), canonical categories
    assert table.loc["P001", "response"] == 1 and table.loc["P002", "response"] == 0
    assert table.loc["P001", "age"] == 60.0 and pd.isna(table.loc["P002", "age"])
    assert table["crm"].tolist() == [1, 0] and table["sex"].tolist() == ["M", "F"]


def test_load_patients_label_trg_without_trg_column_raises(site, make_cfg) -> None:
    # Prepare
    (site.root / "patients.csv").write_text("patient_id,response\nP001,1\n")
    # Execute / Assert: names the file and what to do
    with pytest.raises(CohortError, match=r"patients\.csv.*trg.*data\.label: response"):
        load_patients(site.root, make_cfg(data={"label": "trg"}))


def test_load_patients_missing_site_raises(tmp_path, cfg) -> None:
    with pytest.raises(CohortError, match="site folder not found"):
        load_patients(tmp_path / "missing", cfg)


def test_iter_volumes_lists_required_volumes_with_masks(site) -> None:
    # Prepare: one image missing, one DWI mask missing
    site.path("P003", "post", "t2w").unlink()
    site.path("P001", "pre", "dwi", "mask").unlink()
    # Execute
    records = iter_volumes(site.root, site.cfg)
    # Assert
    assert len(records) == 3 * 2 * 2 - 1
    keys = [(r.patient_id, r.timepoint, r.sequence) for r in records]
    assert ("P003", "post", "t2w") not in keys and keys[0] == ("P001", "pre", "t2w")
    first = records[0]
    assert first.image_path == site.path("P001", "pre", "t2w")
    assert first.mask_path == site.path("P001", "pre", "t2w", "mask")
    assert first.mask2_path == site.path("P001", "pre", "t2w", "mask_rater2")
    dwi = next(r for r in records if r.patient_id == "P001" and r.timepoint == "pre" and r.sequence == "dwi")
    assert dwi.mask_path is None and dwi.mask2_path is None


def test_find_volume_order_and_absence(site) -> None:
    # Prepare: an .mha besides the .nii.gz, and a .nrrd-only volume
    site.write(make_volume("dwi"), "P001", "pre", "dwi", ext=".mha")
    site.path("P002", "pre", "dwi").unlink()
    site.write(make_volume("dwi"), "P002", "pre", "dwi", ext=".nrrd")
    # Execute / Assert
    assert find_volume(site.root, "P001", "pre", "dwi") == site.path("P001", "pre", "dwi")
    assert find_volume(site.root, "P002", "pre", "dwi") == site.path("P002", "pre", "dwi", ext=".nrrd")
    assert find_volume(site.root, "P001", "pre", "adc") is None
    assert find_volume(site.root, "P001", "pre", "t2w", kind="mask") == site.path("P001", "pre", "t2w", "mask")
    with pytest.raises(ValueError, match="kind"):
        find_volume(site.root, "P001", "pre", "t2w", kind="label")


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "empty"),
    (b"\x00" * 400, "no image reader"),
], ids=["zero-bytes", "zeros"])
def test_read_image_errors_name_the_path(tmp_path, content, needle) -> None:
    # Prepare
    p = tmp_path / "t2w.nrrd"
    p.write_bytes(content)
    # Execute / Assert
    with pytest.raises(CohortError) as err:
        read_image(p)
    assert str(p) in str(err.value) and needle in str(err.value)


def test_read_image_rejects_truncated_nifti(tmp_path) -> None:
    # Prepare
    p = tmp_path / "t2w.nii.gz"
    sitk.WriteImage(make_volume("t2w"), str(p))
    p.write_bytes(p.read_bytes()[:-40])
    # Execute / Assert
    with pytest.raises(CohortError, match="truncated"):
        read_image(p)


def test_read_image_roundtrip(site) -> None:
    img = read_image(site.path("P001", "pre", "t2w"))
    assert img.GetSize() == (16, 16, 4) and img.GetSpacing() == pytest.approx((0.7, 0.7, 4.0))
