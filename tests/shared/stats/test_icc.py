"""ICC(2,1)/ICC(3,1): federated == pooled == pingouin, exact on split data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pingouin as pg
import pytest

from shared.stats.icc import ICCProtocol, icc
from shared.stats.sc_legacy import run_site_computed

# pingouin 0.7 uses a pandas keyword deprecated in pandas 3; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.dropna")

SPLITS = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


def ratings(seed: int, n: int = 60, n_features: int = 4) -> np.ndarray:
    """Two raters' VOI features: subject effect + rater bias + noise, features of different reliability."""
    rng = np.random.default_rng(seed)
    subject = rng.normal(50, 10, (n, 1, n_features))
    bias = np.array([0.0, 3.0])[None, :, None]
    noise_sd = np.array([1.0, 4.0, 10.0, 25.0])[:n_features]
    return subject + bias + rng.normal(0, 1, (n, 2, n_features)) * noise_sd


def pingouin_icc(x: np.ndarray) -> pd.DataFrame:
    n = x.shape[0]
    df = pd.DataFrame({"subject": np.repeat(np.arange(n), 2), "rater": np.tile([1, 2], n), "value": x.ravel()})
    return pg.intraclass_corr(df, targets="subject", raters="rater", ratings="value").set_index("Type")


def test_pooled_icc_equals_pingouin():
    x = ratings(0)
    r = icc(x)
    for f in range(x.shape[2]):
        p = pingouin_icc(x[:, :, f])
        assert r["icc2"][f] == pytest.approx(p.loc["ICC(A,1)", "ICC"], abs=1e-12)  # two-way random, absolute
        assert r["icc3"][f] == pytest.approx(p.loc["ICC(C,1)", "ICC"], abs=1e-12)  # two-way mixed, consistency
        assert r["icc2_f"][f] == pytest.approx(p.loc["ICC(A,1)", "F"], rel=1e-10)
        assert r["icc3_p"][f] == pytest.approx(p.loc["ICC(C,1)", "pval"], rel=1e-8, abs=1e-300)
        # pingouin rounds its intervals to 2 decimals
        for kind, row in (("icc2", "ICC(A,1)"), ("icc3", "ICC(C,1)")):
            lo, hi = p.loc[row, "CI95"]
            assert round(r[f"{kind}_ci_lower"][f], 2) == pytest.approx(lo, abs=1e-9)
            assert round(r[f"{kind}_ci_upper"][f], 2) == pytest.approx(hi, abs=1e-9)


def test_icc_hand_computed():
    # 3 subjects x 2 raters: [[1, 2], [3, 5], [5, 6]]; grand mean 11/3.
    # Subject means 1.5, 4, 5.5 -> SS_rows = 2 * sum (m - 11/3)^2 = 49/3; rater means 3, 13/3 -> SS_cols = 8/3
    # SS_tot = 58/3 -> SS_err = 1/3. MSR = 49/6, MSC = 8/3, MSE = (1/3) / 2 = 1/6; ICC(3,1) = 48/50.
    x = np.array([[1.0, 2.0], [3.0, 5.0], [5.0, 6.0]])
    msr, msc, mse = 49 / 6, 8 / 3, 1 / 6
    r = icc(x)
    assert r["icc3"][0] == pytest.approx((msr - mse) / (msr + mse), abs=1e-14)
    assert r["icc3"][0] == pytest.approx(0.96, abs=1e-14)
    assert r["icc2"][0] == pytest.approx((msr - mse) / (msr + mse + 2 * (msc - mse) / 3), abs=1e-14)


@pytest.mark.parametrize("seed,n_sites", SPLITS)
def test_federated_icc_equals_pooled(seed, n_sites, splitter):
    x = ratings(seed)
    parts = splitter(x.shape[0], n_sites, seed)
    names = ["f0", "f1", "f2", "f3"]
    res = run_site_computed(ICCProtocol(names, threshold=0.8), {f"s{i}": x[ix] for i, ix in enumerate(parts)}, 5)
    ref = icc(x)
    assert res.n_rounds == 2
    for key in ("icc2", "icc3", "icc2_ci_lower", "icc2_ci_upper", "icc3_ci_lower", "icc3_ci_upper", "icc2_p"):
        np.testing.assert_allclose(res.released[key], ref[key], rtol=1e-10, atol=1e-12)
    assert res.released["kept"] == [n for n, v in zip(names, ref["icc2"], strict=True) if v >= 0.8]
    assert res.released["kept"][:1] == ["f0"] and "f3" not in res.released["kept"]


def test_icc_is_stable_for_large_offsets():
    x = ratings(2) + 1e8  # a naive sum-of-squares formula loses every digit here
    parts = [np.arange(0, 25), np.arange(25, 60)]
    res = run_site_computed(ICCProtocol(["a", "b", "c", "d"]), {f"s{i}": x[ix] for i, ix in enumerate(parts)}, 5)
    np.testing.assert_allclose(res.released["icc2"], icc(ratings(2))["icc2"], atol=1e-6)


def test_icc_withheld_below_min_count_and_clear_input_errors():
    x = ratings(3, n=4)
    res = run_site_computed(ICCProtocol(["a", "b", "c", "d"]), {"s0": x[:2], "s1": x[2:]}, 5)
    assert "icc2" not in res.released
    assert "min_count=5" in res.released["withheld"][0]["reason"]
    bad = ratings(3, n=10)
    bad[4, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"site 's1'.*subject rows \[4\]"):
        run_site_computed(ICCProtocol(["a", "b", "c", "d"]), {"s0": ratings(4, n=10), "s1": bad}, 5)
