"""Site-computed baseline table ("Table 1") by response (y = 0 / y = 1).

Parameters come from the analysis config, never from data: per variable its ``kind``
(``normal``: mean ± SD and a t-test; ``nonnormal``: median [Q1, Q3] and a Mann-Whitney test;
``categorical``: n (%) per level and a chi-square / Fisher test), for continuous variables the
grid ``edges`` (values must lie in ``[edges[0], edges[-1]]``; a value outside is an error naming the
variable), for categorical variables the numeric ``levels`` (and display ``labels``).

Rounds
------
1. Each site adds per class: the patient count; per continuous variable the sum and the
   histogram on its grid; per categorical variable the count per level.
2. (Only with continuous variables.) Each site adds per variable the sum of squares around the
   pooled group means and around the pooled overall mean (so the SD does not suffer from
   cancellation).

What is computed (from pooled totals, on every site) and released
-----------------------------------------------------------------
Nothing but ``withheld`` unless the pooled cohort has >= ``k`` patients in each group. Then:

* ``n`` per group and overall.
* Continuous: per group and overall ``n``, ``mean``, ``sd`` (exact). Median, Q1, Q3: per group the
  pooled histogram is merged into grid cells of 0 or >= k patients
  (:func:`shared.stats.sc_common.released_cells`); the quantile is interpolated linearly within
  its merged cell (grouped-data quantile), and ``[lo, hi]`` - the numpy (type 7) quantile with
  every patient at its cell's lower / upper edge - certifies where the raw-data quantile lies:
  the resolution is the merged cell width, released as ``lo``/``hi``. Welch (or Student) t-test
  from n, mean, SD (exact). Mann-Whitney U (of group 0 over group 1, as
  ``scipy.stats.mannwhitneyu``) from the pooled *fine* histograms, ties within a grid bin counted
  half; its tie-corrected asymptotic p. Exact when each grid bin holds a single value (e.g.
  integer data with edges at half-integers); otherwise ``u_bound = 0.5 * pairs sharing a bin``
  bounds ``|U - U_raw|``.
* Categorical: counts per level and group and the overall count per level. A cell (group or
  overall) with ``0 < count < k`` is withheld (the marker ``"withheld"``, never a number or NaN); since the
  group totals are published, further cells are withheld (complementary suppression: every row
  level x {group 0, group 1, overall} and every column with a withheld cell gets a second one,
  the smallest non-zero) and a linear-programming audit checks that no withheld cell is
  determined by the released cells and totals; if one were, all counts of the variable are
  withheld. Percentages are of the group's n, for released cells only. The chi-square (Yates for
  2x2) or, for a 2x2 table with an expected count below 5, Fisher's exact test is computed from
  the exact counts only when no cell is withheld; otherwise the release says why.

Compare :func:`shared.stats.table_one` (pooled), which this reproduces for mean, SD, t-test and the
categorical counts and tests when nothing is withheld.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import optimize

from ._checks import check_min_count
from .histogram import weighted_quantile
from .results import TableOne
from .sc_common import (
    check_choice,
    check_column,
    coarsened,
    column_of,
    fnan,
    fnum,
    released_cells,
    withheld,
)
from .sitecomputed import BIG_SUM_SPEC, COUNT_SPEC, CohortData, Released, SiteComputedProtocol, State
from .tableone import QUANTILES, categorical_test, mann_whitney_p, ttest

logger = logging.getLogger(__name__)

KINDS = ("normal", "nonnormal", "categorical")
MAX_VARIABLES = 64
MAX_EDGES = 10001
MAX_LEVELS = 50
WITHHELD = "withheld"
GROUPS = ("overall", "g0", "g1")


def _check_variable(v: Any, i: int) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"variables[{i}] must be a mapping with name, kind and edges or levels, got {v!r}")
    name = check_column(f"variables[{i}].name", v.get("name"))
    kind = check_choice(f"variables[{i}].kind", v.get("kind"), KINDS)
    unknown = set(v) - {"name", "kind", "edges", "levels", "labels"}
    if unknown:
        raise ValueError(f"variable {name!r}: unknown keys {sorted(unknown)}")
    if kind == "categorical":
        levels = v.get("levels")
        if not isinstance(levels, Sequence) or isinstance(levels, str) or not 2 <= len(levels) <= MAX_LEVELS:
            raise ValueError(f"variable {name!r}: levels must list 2 to {MAX_LEVELS} numeric codes")
        lv = [float(x) for x in levels if isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)]
        if len(lv) != len(levels) or len(set(lv)) != len(lv):
            raise ValueError(f"variable {name!r}: levels must be distinct finite numbers, got {levels!r}")
        labels = v.get("labels", [f"{x:g}" for x in lv])
        if not isinstance(labels, Sequence) or len(labels) != len(lv) or not all(isinstance(s, str) for s in labels):
            raise ValueError(f"variable {name!r}: labels must be one string per level")
        return {"name": name, "kind": kind, "levels": lv, "labels": list(labels)}
    edges = v.get("edges")
    if not isinstance(edges, Sequence) or isinstance(edges, str) or not 2 <= len(edges) <= MAX_EDGES:
        raise ValueError(f"variable {name!r}: edges must list 2 to {MAX_EDGES} increasing numbers (a fixed grid)")
    e = np.asarray([float(x) for x in edges], dtype=np.float64)
    if not np.isfinite(e).all() or not (np.diff(e) > 0).all():
        raise ValueError(f"variable {name!r}: edges must be finite and strictly increasing")
    return {"name": name, "kind": kind, "edges": [float(x) for x in e]}


def grid_bin(x: np.ndarray, edges: np.ndarray, name: str) -> np.ndarray:
    """Bin of each value on ``edges`` (bins ``[e_b, e_b+1)``, the last one closed); error outside."""
    bad = (x < edges[0]) | (x > edges[-1])
    if bad.any():
        raise ValueError(f"variable {name!r}: {int(bad.sum())} value(s) outside the agreed grid "
                         f"[{edges[0]:g}, {edges[-1]:g}]; widen the grid in the analysis config")
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2).astype(np.int64)


def grouped_quantiles(counts: np.ndarray, edges: np.ndarray, ranges: list[tuple[int, int]],
                      q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantiles from merged cells: interpolated estimate and certified enclosure.

    Parameters
    ----------
    counts : ndarray of shape (n_bins,)
    edges : ndarray of shape (n_bins + 1,)
    ranges : list of (start, stop)
        Merged cells (bins ``[start, stop)``).
    q : ndarray

    Returns
    -------
    est, lo, hi : ndarray of shape q.shape
        ``est``: the value where the piecewise-linear cumulative count through the merged cells
        reaches ``q * n``; ``lo``/``hi``: type-7 quantile with every patient at its cell's lower /
        upper edge (``lo <= raw quantile <= hi``).
    """
    cnt = np.array([counts[s:t].sum() for s, t in ranges], dtype=np.float64)
    lo_e = np.array([edges[s] for s, _ in ranges])
    hi_e = np.array([edges[t] for _, t in ranges])
    keep = cnt > 0
    cnt, lo_e, hi_e = cnt[keep], lo_e[keep], hi_e[keep]
    n = cnt.sum()
    cum = np.concatenate([[0.0], np.cumsum(cnt)])
    target = np.asarray(q, dtype=np.float64) * n
    i = np.clip(np.searchsorted(cum, target, side="left") - 1, 0, cnt.size - 1)
    est = lo_e[i] + (target - cum[i]) / cnt[i] * (hi_e[i] - lo_e[i])
    ci = np.rint(cnt).astype(np.int64)
    return est, weighted_quantile(lo_e, ci, q), weighted_quantile(hi_e, ci, q)


def suppress(counts: np.ndarray, k: int) -> np.ndarray:
    """Withheld mask of a categorical table with complementary suppression and an LP audit.

    Parameters
    ----------
    counts : ndarray of shape (n_levels, 2)
        Exact pooled counts per level and group (group totals are published).
    k : int

    Returns
    -------
    ndarray of bool, shape (n_levels, 3)
        Columns: group 0, group 1, overall (= group 0 + group 1). All True when the audit finds a
        withheld cell determined by the released ones.
    """
    c = np.asarray(counts, dtype=np.int64)
    full = np.column_stack([c, c.sum(axis=1)])
    w = (full > 0) & (full < k)  # group cells and the overall count of a level alike
    if not w.any():
        return w
    changed = True
    while changed:
        changed = False
        for i in range(full.shape[0]):  # rows: g0 + g1 = overall
            if w[i].sum() == 1:
                cand = [j for j in range(3) if not w[i, j]]
                j = min(cand, key=lambda j: (full[i, j] == 0, full[i, j], j))
                w[i, j] = changed = True
        for j in range(3):  # columns: sum = published total
            if w[:, j].sum() == 1:
                cand = [i for i in range(full.shape[0]) if not w[i, j]]
                if not cand:
                    continue
                i = min(cand, key=lambda i: (full[i, j] == 0, full[i, j], i))
                w[i, j] = changed = True
    if determined(full, w):
        return np.ones_like(w)
    return w


def determined(full: np.ndarray, w: np.ndarray) -> bool:
    """True when some withheld cell takes a single value over all non-negative tables consistent with
    the released cells, the row relation (overall = g0 + g1) and the column totals (LP bounds)."""
    idx = {tuple(ij): v for v, ij in enumerate(np.argwhere(w))}
    nv = len(idx)
    if nv == 0:
        return False
    rows_a, rows_b = [], []

    def term(i: int, j: int) -> tuple[np.ndarray, float]:
        a = np.zeros(nv)
        if (i, j) in idx:
            a[idx[(i, j)]] = 1.0
            return a, 0.0
        return a, float(full[i, j])

    for i in range(full.shape[0]):  # g0 + g1 - overall = 0
        a0, k0 = term(i, 0)
        a1, k1 = term(i, 1)
        a2, k2 = term(i, 2)
        rows_a.append(a0 + a1 - a2)
        rows_b.append(k2 - k0 - k1)
    for j in range(3):  # column sums
        a = np.zeros(nv)
        const = 0.0
        for i in range(full.shape[0]):
            ai, ki = term(i, j)
            a += ai
            const += ki
        rows_a.append(a)
        rows_b.append(float(full[:, j].sum()) - const)
    A, b = np.array(rows_a), np.array(rows_b)
    for v in range(nv):
        e = np.zeros(nv)
        e[v] = 1.0
        lo = optimize.linprog(e, A_eq=A, b_eq=b, bounds=[(0, None)] * nv, method="highs")
        hi = optimize.linprog(-e, A_eq=A, b_eq=b, bounds=[(0, None)] * nv, method="highs")
        if lo.status != 0 or hi.status not in (0, 3):
            return True  # be safe
        if hi.status == 0 and -hi.fun - lo.fun < 0.5:
            return True
    return False


class TableOneSite(SiteComputedProtocol):
    """Baseline characteristics by response (see the module docstring).

    Parameters
    ----------
    variables : list of dict
        ``{"name", "kind": "normal"|"nonnormal", "edges": [...]}`` or
        ``{"name", "kind": "categorical", "levels": [...], "labels": [...]}``; at most 64.
    group_labels : list of str
        Display names of y = 0 and y = 1.
    equal_var : bool
        Student (True) or Welch (False) t-test.
    """

    name: ClassVar[str] = "table_one"
    max_rounds: ClassVar[int] = 2

    def __init__(self, variables: Sequence[Mapping[str, Any]], group_labels: Sequence[str] = ("0", "1"),
                 equal_var: bool = False) -> None:
        super().__init__()
        if isinstance(variables, str | bytes) or not isinstance(variables, Sequence) \
                or not 1 <= len(variables) <= MAX_VARIABLES:
            raise ValueError(f"variables must be a list of 1 to {MAX_VARIABLES} variable specs")
        vs = [_check_variable(v, i) for i, v in enumerate(variables)]
        if len({v["name"] for v in vs}) != len(vs):
            raise ValueError("variables must have distinct names")
        if isinstance(group_labels, str) or len(group_labels) != 2 or not all(isinstance(g, str) for g in group_labels):
            raise ValueError(f"group_labels must be two strings, got {group_labels!r}")
        if not isinstance(equal_var, bool):
            raise ValueError(f"equal_var must be true or false, got {equal_var!r}")
        self._keep(variables=vs, group_labels=list(group_labels), equal_var=equal_var)
        self.variables = vs
        self.group_labels = list(group_labels)
        self.equal_var = equal_var
        self._edges = {v["name"]: np.asarray(v["edges"]) for v in vs if v["kind"] != "categorical"}
        self._continuous = [v["name"] for v in vs if v["kind"] != "categorical"]

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        if state["round"] == 0:
            out: dict[str, dict[str, Any]] = {"n": {"shape": (2,), **COUNT_SPEC}}
            for j, v in enumerate(self.variables):
                if v["kind"] == "categorical":
                    out[f"v{j}.counts"] = {"shape": (len(v["levels"]), 2), **COUNT_SPEC}
                else:
                    out[f"v{j}.sum"] = {"shape": (2,), **BIG_SUM_SPEC}
                    out[f"v{j}.hist"] = {"shape": (len(v["edges"]) - 1, 2), **COUNT_SPEC}
            return out
        return {f"v{j}.ss": {"shape": (3,), **BIG_SUM_SPEC}
                for j, v in enumerate(self.variables) if v["kind"] != "categorical"}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        y = data.y
        out: dict[str, np.ndarray] = {}
        if state["round"] == 0:
            out["n"] = np.array([(y == 0).sum(), (y == 1).sum()], dtype=np.float64)
        for j, v in enumerate(self.variables):
            x = column_of(data, v["name"])
            if v["kind"] == "categorical":
                if state["round"] != 0:
                    continue
                lv = np.asarray(v["levels"])
                known = np.isin(x, lv)
                if not known.all():
                    raise ValueError(f"variable {v['name']!r}: {int((~known).sum())} value(s) outside the agreed "
                                     f"levels {v['levels']}")
                li = np.searchsorted(np.sort(lv), x)
                order = np.argsort(lv)
                li = order[li]
                out[f"v{j}.counts"] = np.bincount(li * 2 + y, minlength=2 * lv.size).reshape(lv.size, 2).astype(
                    np.float64)
                continue
            b = grid_bin(x, self._edges[v["name"]], v["name"])
            if state["round"] == 0:
                nb = self._edges[v["name"]].size - 1
                out[f"v{j}.sum"] = np.array([x[y == 0].sum(), x[y == 1].sum()])
                out[f"v{j}.hist"] = np.bincount(b * 2 + y, minlength=2 * nb).reshape(nb, 2).astype(np.float64)
            else:
                mean = np.asarray(state[f"v{j}.mean"], dtype=np.float64)  # overall, g0, g1
                out[f"v{j}.ss"] = np.array([((x - mean[0]) ** 2).sum(), ((x[y == 0] - mean[1]) ** 2).sum(),
                                            ((x[y == 1] - mean[2]) ** 2).sum()])
        return out

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        new = dict(state)
        if state["round"] == 0:
            n = np.rint(np.asarray(totals["n"])).astype(np.int64)
            new["n"] = [int(n[0]), int(n[1])]
            for j, v in enumerate(self.variables):
                if v["kind"] == "categorical":
                    new[f"v{j}.counts"] = np.rint(np.asarray(totals[f"v{j}.counts"])).astype(np.int64)
                    continue
                s = np.asarray(totals[f"v{j}.sum"], dtype=np.float64)
                with np.errstate(invalid="ignore", divide="ignore"):
                    new[f"v{j}.mean"] = np.array([s.sum() / n.sum(), s[0] / n[0], s[1] / n[1]])
                new[f"v{j}.hist"] = np.rint(np.asarray(totals[f"v{j}.hist"])).astype(np.int64)
            new["round"] = 1
            return new, not self._continuous
        for j, v in enumerate(self.variables):
            if v["kind"] != "categorical":
                new[f"v{j}.ss"] = np.maximum(np.asarray(totals[f"v{j}.ss"], dtype=np.float64), 0.0)
        new["round"] = 2
        return new, True

    # -- release -----------------------------------------------------------------------------
    def _continuous_release(self, state: State, j: int, v: dict[str, Any], k: int) -> dict[str, Any]:
        n0, n1 = state["n"]
        ns = np.array([n0 + n1, n0, n1], dtype=np.float64)
        mean = np.asarray(state[f"v{j}.mean"], dtype=np.float64)
        ss = np.asarray(state[f"v{j}.ss"], dtype=np.float64)
        sd = np.where(ns > 1, np.sqrt(ss / np.maximum(ns - 1, 1)), np.nan)
        hist = np.asarray(state[f"v{j}.hist"], dtype=np.int64)
        edges = np.asarray(v["edges"], dtype=np.float64)
        groups: dict[str, Any] = {}
        for gi, (g, h) in enumerate(zip(GROUPS, (hist.sum(axis=1), hist[:, 0], hist[:, 1]), strict=True)):
            rec: dict[str, Any] = {"n": int(ns[gi]), "mean": fnum(mean[gi]), "sd": fnum(sd[gi])}
            if v["kind"] == "nonnormal":
                ranges = released_cells(h, k)
                if ranges is None:
                    rec.update(median=None, q1=None, q3=None, withheld="fewer than k patients")
                else:
                    est, lo, hi = grouped_quantiles(h, edges, ranges, QUANTILES)
                    for name, e, a, b in zip(("median", "q1", "q3"), est, lo, hi, strict=True):
                        rec[name] = fnum(e)
                        rec[f"{name}_lo"] = fnum(a)
                        rec[f"{name}_hi"] = fnum(b)
                    rec["merged_cells"] = len(ranges)
                    rec["coarsened"] = coarsened(h, ranges)
            groups[g] = rec
        out: dict[str, Any] = {"name": v["name"], "kind": v["kind"], "groups": groups}
        if v["kind"] == "normal":
            out["test"], out["statistic"], out["p"] = ttest(
                [int(n0), int(n1)], [float(mean[1]), float(mean[2])], [float(sd[1]), float(sd[2])], self.equal_var)
        else:
            c0, c1 = hist[:, 0].astype(np.float64), hist[:, 1].astype(np.float64)
            u = float(c0 @ (np.cumsum(c1) - c1 + 0.5 * c1))
            t = hist.sum(axis=1).astype(np.float64)
            out["test"], out["statistic"] = "Mann-Whitney U", u
            out["p"] = mann_whitney_p(u, int(n0), int(n1), float((t**3 - t).sum()))
            out["u_bound"] = fnum(0.5 * float(c0 @ c1))
        out["statistic"], out["p"] = fnum(out["statistic"]), fnum(out["p"])
        return out

    def _categorical_release(self, state: State, j: int, v: dict[str, Any], k: int) -> dict[str, Any]:
        counts = np.asarray(state[f"v{j}.counts"], dtype=np.int64)
        full = np.column_stack([counts.sum(axis=1), counts])  # overall, g0, g1
        w = suppress(counts, k)
        w = np.column_stack([w[:, 2], w[:, 0], w[:, 1]])
        n0, n1 = state["n"]
        ns = [n0 + n1, n0, n1]
        groups = {}
        for gi, g in enumerate(GROUPS):
            cells, pct = [], []
            for li in range(counts.shape[0]):
                if w[li, gi]:
                    cells.append(WITHHELD)
                    pct.append(WITHHELD)
                else:
                    cells.append(int(full[li, gi]))
                    pct.append(fnum(100.0 * full[li, gi] / ns[gi]) if ns[gi] else None)
            groups[g] = {"n": int(ns[gi]), "counts": cells, "percent": pct}
        out: dict[str, Any] = {"name": v["name"], "kind": "categorical", "levels": v["labels"], "groups": groups}
        if w.any():
            out.update(test="not computed", statistic=None, p=None,
                       note=f"cells with 0 < count < k={k} withheld (and complementary cells so that the "
                            "published totals do not reveal them); no test on counts that are not all released")
            if w.all():
                out["note"] = f"all counts withheld: a cell below k={k} could not otherwise be protected"
        else:
            test, stat, p = categorical_test(counts.astype(np.float64))
            out.update(test=test, statistic=fnum(stat), p=fnum(p))
        return out

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        n0, n1 = (int(x) for x in state["n"])
        out: Released = {"protocol": self.name, "group_labels": self.group_labels}
        if n0 < k or n1 < k:
            return {**out, "released": False, "withheld": [withheld(
                "table_one", f"a response group has fewer than k={k} patients; the table is withheld")]}
        variables, notes = [], []
        for j, v in enumerate(self.variables):
            if v["kind"] == "categorical":
                rec = self._categorical_release(state, j, v, k)
                if rec.get("note"):
                    notes.append(withheld(f"table_one.{v['name']}", rec["note"]))
            else:
                rec = self._continuous_release(state, j, v, k)
                merged = [g for g, r in rec["groups"].items() if r.get("coarsened")]
                if merged:
                    notes.append(withheld(f"table_one.{v['name']}.quantiles",
                                          f"quantiles interpolated within grid cells merged to hold 0 or >= k={k} "
                                          "patients; [lo, hi] gives the resolution"))
            variables.append(rec)
        return {**out, "released": True, "n": {"overall": n0 + n1, "g0": n0, "g1": n1}, "variables": variables,
                "withheld": notes}

    def result(self, released: Released) -> TableOne | None:
        """A :class:`~shared.stats.results.TableOne` (withheld counts shown as ``withheld``); None if withheld."""
        if not released.get("released"):
            return None
        labels = list(released["group_labels"])
        cols = ["overall", *labels]
        gkey = dict(zip(cols, GROUPS, strict=True))
        n = released["n"]
        rows: list[tuple[str, list[str]]] = [("n", [str(n[gkey[c]]) for c in cols] + ["", ""])]
        recs, tests = [], []
        for v in released["variables"]:
            p = fnan(v["p"])
            ptxt = "" if not np.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
            tests.append({"variable": v["name"], "test": v["test"], "statistic": fnan(v["statistic"]), "p": p})
            if v["kind"] == "categorical":
                rows.append((f"{v['name']}, n (%)", [""] * len(cols) + [ptxt, v["test"]]))
                for li, lev in enumerate(v["levels"]):
                    cells = []
                    for c in cols:
                        g = v["groups"][gkey[c]]
                        cnt, pct = g["counts"][li], g["percent"][li]
                        cells.append(WITHHELD if cnt == WITHHELD else f"{cnt} ({fnan(pct):.1f})")
                        recs.append({"variable": v["name"], "level": str(lev), "group": c, "n": g["n"],
                                     "count": np.nan if cnt == WITHHELD else float(cnt),
                                     "percent": np.nan if pct == WITHHELD else fnan(pct),
                                     "withheld": cnt == WITHHELD})
                    rows.append((f"  {lev}", [*cells, "", ""]))
                continue
            label = f"{v['name']}, median [IQR]" if v["kind"] == "nonnormal" else f"{v['name']}, mean ± SD"
            cells = []
            for c in cols:
                g = v["groups"][gkey[c]]
                recs.append({"variable": v["name"], "level": "", "group": c, "n": g["n"], "mean": fnan(g["mean"]),
                             "sd": fnan(g["sd"]), "median": fnan(g.get("median")), "q1": fnan(g.get("q1")),
                             "q3": fnan(g.get("q3")), "withheld": False})
                if v["kind"] == "nonnormal":
                    cells.append(f"{fnan(g.get('median')):.4g} [{fnan(g.get('q1')):.4g}, {fnan(g.get('q3')):.4g}]")
                else:
                    cells.append(f"{fnan(g['mean']):.4g} ± {fnan(g['sd']):.4g}")
            rows.append((label, [*cells, ptxt, v["test"]]))
        # level labels may repeat across variables: keep every row (the pooled table's dict would not)
        table = pd.DataFrame([r for _, r in rows], index=pd.Index([lab for lab, _ in rows]),
                             columns=[*cols, "p", "test"])
        stat_cols = ["n", "mean", "sd", "median", "q1", "q3", "count", "percent"]
        st = pd.DataFrame(recs).reindex(columns=["variable", "level", "group", *stat_cols, "withheld"])
        st = st.astype({c: np.float64 for c in stat_cols}).set_index(["variable", "level", "group"])
        tt = pd.DataFrame(tests).reindex(columns=["variable", "test", "statistic", "p"]).set_index("variable")
        return TableOne(table, st, tt)
