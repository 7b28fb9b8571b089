"""Pooled baseline table ("Table 1") comparing two groups.

Continuous columns: mean ± SD and a Welch (default) or Student t-test, or, for columns listed in
``nonnormal``, median [Q1, Q3] (numpy's default linear quantiles) and the Mann-Whitney U test
(normal approximation with tie correction and continuity correction, as
``scipy.stats.mannwhitneyu(method="asymptotic")``). Categorical columns (object, category, bool
or string dtype): n (%) per level, chi-square test (``scipy.stats.chi2_contingency``, Yates'
correction for 2x2) or, for a 2x2 table with an expected count below 5, Fisher's exact test.
Missing values are dropped per variable; percentages are of the non-missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from .results import TableOne

logger = logging.getLogger(__name__)

QUANTILES = np.array([0.5, 0.25, 0.75])
STAT_COLUMNS = ["n", "mean", "sd", "median", "q1", "q3", "count", "percent"]


@dataclass
class VarStats:
    """Numbers for one variable; ``groups`` maps group label ("overall", g0, g1) to its numbers."""

    name: str
    kind: str  # "normal" | "nonnormal" | "categorical"
    levels: list = field(default_factory=list)
    groups: dict[str, dict[str, float | np.ndarray]] = field(default_factory=dict)
    test: str = "none"
    statistic: float = float("nan")
    p: float = float("nan")


def is_categorical(s: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)


def two_groups(values: pd.Series, group: str) -> list:
    levels = sorted(pd.unique(values.dropna()))
    if len(levels) != 2:
        raise ValueError(f"group column {group!r} must have exactly 2 values, found {len(levels)}")
    return levels


def ttest(n: list[int], mean: list[float], sd: list[float], equal_var: bool) -> tuple[str, float, float]:
    """t-test from summary statistics of the two groups (``scipy.stats.ttest_ind_from_stats``)."""
    name = "Student t-test" if equal_var else "Welch t-test"
    if min(n) < 2:
        return name, float("nan"), float("nan")
    r = stats.ttest_ind_from_stats(mean[0], sd[0], n[0], mean[1], sd[1], n[1], equal_var=equal_var)
    return name, float(r.statistic), float(r.pvalue)


def mann_whitney_p(u1: float, n0: int, n1: int, tie: float) -> float:
    """Two-sided asymptotic Mann-Whitney p (tie and continuity corrected), as scipy."""
    n = n0 + n1
    if n0 == 0 or n1 == 0:
        return float("nan")
    u = max(u1, n0 * n1 - u1)
    s = np.sqrt(n0 * n1 / 12 * ((n + 1) - tie / (n * (n - 1))))
    if s == 0:
        return float("nan")
    z = (u - n0 * n1 / 2 - 0.5) / s
    return float(np.clip(2 * stats.norm.sf(z), 0, 1))


def categorical_test(counts: np.ndarray) -> tuple[str, float, float]:
    """Chi-square or Fisher test on a (levels, 2) count table (empty rows/columns dropped)."""
    t = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]
    if t.shape[0] < 2 or t.shape[1] < 2:
        return "none", float("nan"), float("nan")
    expected = stats.contingency.expected_freq(t)
    if t.shape == (2, 2) and expected.min() < 5:
        r = stats.fisher_exact(t)
        return "Fisher exact", float(r.statistic), float(r.pvalue)
    r = stats.chi2_contingency(t)
    return "chi-square", float(r.statistic), float(r.pvalue)


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def assemble(variables: list[VarStats], labels: list[str], n: dict[str, int]) -> TableOne:
    """Build the :class:`TableOne` from per-variable numbers (shared by pooled and federated)."""
    cols = ["overall", *labels]
    rows: dict[str, list[str]] = {"n": [str(n[c]) for c in cols] + ["", ""]}
    recs: list[dict] = []
    tests: list[dict] = []
    for v in variables:
        tests.append({"variable": v.name, "test": v.test, "statistic": v.statistic, "p": v.p})
        if v.kind == "categorical":
            rows[f"{v.name}, n (%)"] = [""] * len(cols) + [_fmt_p(v.p), v.test]
            for li, lev in enumerate(v.levels):
                cells = []
                for c in cols:
                    g = v.groups[c]
                    cnt = float(g["counts"][li])
                    pct = 100.0 * cnt / g["n"] if g["n"] else float("nan")
                    cells.append(f"{int(cnt)} ({pct:.1f})")
                    recs.append({"variable": v.name, "level": str(lev), "group": c, "n": g["n"], "count": cnt,
                                 "percent": pct})
                rows[f"  {lev}"] = [*cells, "", ""]
            continue
        label = f"{v.name}, median [IQR]" if v.kind == "nonnormal" else f"{v.name}, mean ± SD"
        cells = []
        for c in cols:
            g = v.groups[c]
            recs.append({"variable": v.name, "level": "", "group": c, **{k: g.get(k, np.nan) for k in STAT_COLUMNS
                                                                        if k not in ("count", "percent")}})
            if v.kind == "nonnormal":
                cells.append(f"{g['median']:.4g} [{g['q1']:.4g}, {g['q3']:.4g}]")
            else:
                cells.append(f"{g['mean']:.4g} ± {g['sd']:.4g}")
        rows[label] = [*cells, _fmt_p(v.p), v.test]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*cols, "p", "test"])
    st = pd.DataFrame(recs).reindex(columns=["variable", "level", "group", *STAT_COLUMNS])
    st = st.astype({k: np.float64 for k in STAT_COLUMNS}).set_index(["variable", "level", "group"])
    tt = pd.DataFrame(tests).reindex(columns=["variable", "test", "statistic", "p"]).set_index("variable")
    return TableOne(table, st, tt)


def table_one(df: pd.DataFrame, group: str, columns: list[str], nonnormal: tuple[str, ...] | list[str] = (),
              equal_var: bool = False) -> TableOne:
    """Baseline characteristics by a two-valued group, with tests.

    Parameters
    ----------
    df : DataFrame of shape (n_patients, n_columns)
    group : str
        Column with exactly two distinct non-missing values (rows missing it are dropped).
    columns : list of str
        Variables to describe; categorical by dtype (object, category, bool, string).
    nonnormal : sequence of str
        Continuous columns summarised as median [IQR] and tested with Mann-Whitney.
    equal_var : bool
        Student (True) or Welch (False) t-test.

    Returns
    -------
    TableOne
    """
    if group not in df.columns:
        raise ValueError(f"group column {group!r} not in the DataFrame")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the DataFrame")
    bad = [c for c in nonnormal if c not in columns or is_categorical(df[c])]
    if bad:
        raise ValueError(f"nonnormal columns {bad} are not continuous columns of the table")
    d = df[df[group].notna()]
    g0, g1 = two_groups(d[group], group)
    labels = [str(g0), str(g1)]
    masks = {"overall": np.ones(len(d), bool), labels[0]: (d[group] == g0).to_numpy(),
             labels[1]: (d[group] == g1).to_numpy()}
    n = {k: int(m.sum()) for k, m in masks.items()}
    out: list[VarStats] = []
    for c in columns:
        s = d[c]
        if is_categorical(s):
            levels = sorted(pd.unique(s.dropna()))
            v = VarStats(c, "categorical", levels)
            for k, m in masks.items():
                x = s[m].dropna()
                v.groups[k] = {"n": len(x), "counts": np.array([(x == lev).sum() for lev in levels], np.float64)}
            v.test, v.statistic, v.p = categorical_test(np.column_stack([v.groups[lab]["counts"] for lab in labels]))
            out.append(v)
            continue
        x = {k: s[m].dropna().to_numpy(np.float64) for k, m in masks.items()}
        v = VarStats(c, "nonnormal" if c in nonnormal else "normal")
        for k, xv in x.items():
            g: dict[str, float] = {"n": xv.size, "mean": float(xv.mean()) if xv.size else np.nan,
                                   "sd": float(xv.std(ddof=1)) if xv.size > 1 else np.nan}
            if v.kind == "nonnormal":
                g["median"], g["q1"], g["q3"] = (np.quantile(xv, QUANTILES) if xv.size else [np.nan] * 3)
            v.groups[k] = g
        if v.kind == "nonnormal":
            a, b = x[labels[0]], x[labels[1]]
            if a.size and b.size:
                r = stats.mannwhitneyu(a, b, method="asymptotic")
                v.test, v.statistic, v.p = "Mann-Whitney U", float(r.statistic), float(r.pvalue)
        else:
            v.test, v.statistic, v.p = ttest([x[lab].size for lab in labels],
                                             [v.groups[lab]["mean"] for lab in labels],
                                             [v.groups[lab]["sd"] for lab in labels], equal_var)
        out.append(v)
    return assemble(out, labels, n)
