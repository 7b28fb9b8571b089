"""Property tests: arbitrary bytes never crash the readers or the checker."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.cohort import CohortError, check_site, load_patients, read_image
from shared.config import parse_config

CFG = parse_config({"data": {"sequences": ["t2w"], "timepoints": ["pre"]}})
CSV_CHARS = st.sampled_from(list("P0123456789,;\"\n \tabx.-_") + ["trg", "response", "patient_id", "age", "NA"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(CSV_CHARS, max_size=60).map("".join), header=st.booleans())
def test_any_patients_csv_is_reported_never_raised(text: str, header: bool) -> None:
    # Prepare: arbitrary CSV-ish text, optionally after a valid header
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / "patients.csv").write_text(("patient_id,trg,response,age\n" if header else "") + text)
        # Execute
        report = check_site(site, CFG)
        # Assert: a report always; load_patients either loads or raises CohortError
        assert report.n_usable_patients <= report.n_patients
        try:
            table = load_patients(site, CFG)
        except CohortError as exc:
            assert "patients.csv" in str(exc)
        else:
            assert table["patient_id"].is_unique
            assert set(table["response"].dropna().tolist()) <= {0, 1}


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=2048), ext=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]))
def test_random_bytes_raise_cohort_error_only(data: bytes, ext: str) -> None:
    # Prepare
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"t2w{ext}"
        p.write_bytes(data)
        # Execute / Assert: either an image or a CohortError naming the file
        try:
            read_image(p)
        except CohortError as exc:
            assert str(p) in str(exc)
