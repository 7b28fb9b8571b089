"""Federated baseline table (one round).

Site data is ``(df, spec)``: the site's DataFrame and the :class:`TableSpec` every party holds
(group values, columns, categorical levels, grids for the non-normal columns: a data dictionary,
no patient data). Per variable and group each site sends:

* continuous: ``n``, ``sum`` and the centred sum of squares ``m2`` -> pooled mean, SD (Chan et
  al.'s parallel update) and t-test: exact;
* non-normal continuous, additionally: the cells of its histogram on the variable's grid ->
  median and IQR by :func:`shared.stats.histogram.cells_quantiles` and Mann-Whitney U by
  :func:`shared.stats.histogram.mann_whitney_cells`. Exact for on-grid values without merging;
  in general ``bound["<var>.<group>.median"]`` (etc.) is the distance from the estimate to the
  far end of a certified enclosure ``lo <= q_raw <= hi`` of the raw-data quantile (about one
  bin width without merging, as the grid cannot tell on-grid from off-grid values), and ``bound["<var>.U"] = 0.5 * unresolved pairs``
  bounds the U statistic; the p-value then uses the estimated U and the ties of single-bin
  cells only (not bounded);
* categorical: counts per level -> n (%), chi-square / Fisher: exact.

Disclosure: a site whose group has ``0 < n < min_count`` patients is excluded from the table; a
variable whose non-missing values in a group number ``0 < n < min_count``, or a categorical
count ``0 < count < min_count``, excludes the site from that variable; histogram cells are merged
as everywhere. All recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ._checks import DEFAULT_MIN_COUNT, small, where
from .histogram import Cells, Grid, cells_quantiles, mann_whitney_cells, tie_term
from .protocol import (
    EXCLUDED_CELL,
    EXCLUDED_GROUP,
    MERGED,
    FederatedProtocol,
    Final,
    Params,
    Summary,
    run_protocol,
    site_min_count,
)
from .results import Federated, TableOne
from .tableone import QUANTILES, VarStats, assemble, categorical_test, is_categorical, mann_whitney_p, ttest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    """The agreed schema of a federated Table 1.

    Attributes
    ----------
    group : str
        Group column.
    groups : tuple
        Its two values, in display order.
    columns : tuple of str
    levels : dict
        Categorical column -> ordered list of levels.
    nonnormal : tuple of str
    grids : dict
        Non-normal column -> :class:`Grid`.
    equal_var : bool
    """

    group: str
    groups: tuple
    columns: tuple[str, ...]
    levels: dict[str, list] = field(default_factory=dict)
    nonnormal: tuple[str, ...] = ()
    grids: dict[str, Grid] = field(default_factory=dict)
    equal_var: bool = False

    def __post_init__(self) -> None:
        if len(self.groups) != 2:
            raise ValueError(f"groups must hold exactly 2 values, got {self.groups!r}")
        missing = [c for c in self.nonnormal if c not in self.grids]
        if missing:
            raise ValueError(f"non-normal columns {missing} need a grid (grids={{column: Grid}})")


def _m2(x: np.ndarray) -> float:
    return float(((x - x.mean()) ** 2).sum()) if x.size else 0.0


def _combine(parts: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Pool (n, sum, m2) triples: returns (n, mean, m2)."""
    n = sum(p[0] for p in parts)
    if n == 0:
        return 0, float("nan"), float("nan")
    mean = sum(p[1] for p in parts) / n
    m2 = sum(p[2] + p[0] * (p[1] / p[0] - mean) ** 2 for p in parts if p[0])
    return n, mean, m2


class TableOneProtocol(FederatedProtocol):
    """One-round Table 1; site data ``(df, spec)``."""

    name = "table_one"

    def __init__(self, spec: TableSpec, *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(min_count=min_count)
        self.spec = spec

    def start(self) -> Params:
        return {"round": 1, "min_count": self.min_count}

    @staticmethod
    def site_step(data: tuple[pd.DataFrame, TableSpec], params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        k = site_min_count(params, min_count)
        df, spec = data
        missing = [c for c in (spec.group, *spec.columns) if c not in df.columns]
        if missing:
            raise ValueError(f"columns {missing} missing{where(site)}")
        out: Summary = {"round": 1, "min_count": k}
        gv = df[spec.group]
        unknown = set(pd.unique(gv.dropna())) - set(spec.groups)
        if unknown:
            raise ValueError(f"group column {spec.group!r}{where(site)} has values outside {list(spec.groups)}")
        masks = [(gv == g).to_numpy() for g in spec.groups]
        n_group = np.array([m.sum() for m in masks], dtype=np.int64)
        if small(n_group, k):
            return {**out, "excluded": 1, "supp.table_one": EXCLUDED_GROUP}
        out.update({"excluded": 0, "n_group": n_group})
        for c in spec.columns:
            s = df[c]
            if c in spec.levels:
                levels = list(spec.levels[c])
                x = [s[m].dropna() for m in masks]
                extra = set().union(*(set(pd.unique(xi)) for xi in x)) - set(levels)
                if extra:
                    raise ValueError(f"column {c!r}{where(site)} has values outside the agreed levels")
                counts = np.array([[(xi == lev).sum() for xi in x] for lev in levels], dtype=np.int64)
                if small(counts, k):
                    out[f"supp.table_one.{c}"] = EXCLUDED_CELL
                    continue
                out[f"{c}.counts"] = counts
                continue
            if is_categorical(s):
                raise ValueError(f"column {c!r}{where(site)} is not numeric but has no agreed levels")
            x = [s[m].dropna().to_numpy(np.float64) for m in masks]
            if not all(np.isfinite(xi).all() for xi in x):
                raise ValueError(f"column {c!r}{where(site)} contains infinite values")
            if small(np.array([xi.size for xi in x]), k):
                out[f"supp.table_one.{c}"] = EXCLUDED_GROUP
                continue
            for j, xi in enumerate(x):
                out.update({f"{c}.g{j}.n": int(xi.size), f"{c}.g{j}.sum": float(xi.sum()), f"{c}.g{j}.m2": _m2(xi)})
                if c in spec.nonnormal:
                    grid = spec.grids[c]
                    cells, merged = Cells.from_bins(grid.bin(xi, c, site), grid.n_bins, k)
                    out.update(cells.to_summary(f"{c}.g{j}"))
                    if merged:
                        out[f"supp.table_one.{c}.g{j}"] = MERGED
        return out

    def server_step(self, summaries: Mapping[str, Summary]) -> Final:
        self.log_suppressions(summaries)
        spec = self.spec
        inc = [s for s, v in summaries.items() if not int(v.get("excluded", 0))]
        if not inc:
            raise ValueError("every site was excluded from table_one by disclosure control")
        labels = [str(g) for g in spec.groups]
        ng = sum(np.asarray(summaries[s]["n_group"]) for s in inc)
        n = {"overall": int(ng.sum()), labels[0]: int(ng[0]), labels[1]: int(ng[1])}
        bound: dict[str, float] = {}
        out: list[VarStats] = []
        for c in spec.columns:
            have = [s for s in inc if f"{c}.counts" in summaries[s] or f"{c}.g0.n" in summaries[s]]
            if c in spec.levels:
                v = VarStats(c, "categorical", list(spec.levels[c]))
                counts = (sum(np.asarray(summaries[s][f"{c}.counts"], np.float64) for s in have) if have
                          else np.zeros((len(v.levels), 2)))
                for key, col in (("overall", counts.sum(axis=1)), (labels[0], counts[:, 0]), (labels[1], counts[:, 1])):
                    v.groups[key] = {"n": int(col.sum()), "counts": col}
                v.test, v.statistic, v.p = categorical_test(counts)
                out.append(v)
                continue
            v = VarStats(c, "nonnormal" if c in spec.nonnormal else "normal")
            trip = [[(int(summaries[s][f"{c}.g{j}.n"]), float(summaries[s][f"{c}.g{j}.sum"]),
                      float(summaries[s][f"{c}.g{j}.m2"])) for s in have] for j in (0, 1)]
            for key, parts in (("overall", trip[0] + trip[1]), (labels[0], trip[0]), (labels[1], trip[1])):
                nn, mean, m2 = _combine(parts)
                v.groups[key] = {"n": nn, "mean": mean, "sd": float(np.sqrt(m2 / (nn - 1))) if nn > 1 else np.nan}
            if v.kind == "nonnormal":
                grid = spec.grids[c]
                cells = [Cells.concat([Cells.from_summary(summaries[s], f"{c}.g{j}", grid.n_bins) for s in have],
                                      grid.n_bins) for j in (0, 1)]
                allc = Cells.concat(cells, grid.n_bins)
                for key, cc in (("overall", allc), (labels[0], cells[0]), (labels[1], cells[1])):
                    if cc.n == 0:
                        v.groups[key].update(median=np.nan, q1=np.nan, q3=np.nan)
                        continue
                    est, lo, hi = cells_quantiles(cc, grid, QUANTILES)
                    for name, e, a, b in zip(("median", "q1", "q3"), est, lo, hi, strict=True):
                        v.groups[key][name] = float(e)
                        bound[f"{c}.{key}.{name}"] = float(max(e - a, b - e))
                if cells[0].n and cells[1].n:
                    u, unresolved = mann_whitney_cells(cells[0], cells[1])
                    v.test, v.statistic = "Mann-Whitney U", u
                    v.p = mann_whitney_p(u, cells[0].n, cells[1].n, tie_term(allc))
                    bound[f"{c}.U"] = 0.5 * unresolved
            else:
                v.test, v.statistic, v.p = ttest([v.groups[lab]["n"] for lab in labels],
                                                 [v.groups[lab]["mean"] for lab in labels],
                                                 [v.groups[lab]["sd"] for lab in labels], spec.equal_var)
            out.append(v)
        return Final(assemble(out, labels, n), bound)


def make_spec(frames: Sequence[pd.DataFrame], group: str, columns: Sequence[str], nonnormal: Sequence[str] = (),
              grids: Mapping[str, Grid] | None = None, equal_var: bool = False,
              levels: Mapping[str, list] | None = None) -> TableSpec:
    """A :class:`TableSpec` for a simulation: group values and levels default to the sorted union of
    the values in ``frames`` (in a real federation they come from the data dictionary)."""
    groups = sorted(set().union(*(set(pd.unique(f[group].dropna())) for f in frames)))
    lv = dict(levels or {})
    for c in columns:
        if c not in lv and any(is_categorical(f[c]) for f in frames):
            lv[c] = sorted(set().union(*(set(pd.unique(f[c].dropna())) for f in frames)))
    return TableSpec(group, tuple(groups), tuple(columns), lv, tuple(nonnormal), dict(grids or {}), equal_var)


def federated_table_one(
    sites: Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame], group: str, columns: Sequence[str],
    nonnormal: Sequence[str] = (), grids: Mapping[str, Grid] | None = None, equal_var: bool = False,
    levels: Mapping[str, list] | None = None, min_count: int = DEFAULT_MIN_COUNT,
) -> Federated[TableOne]:
    """Federated :func:`shared.stats.table_one`; one DataFrame per site.

    ``grids`` must give a :class:`Grid` for every ``nonnormal`` column.
    """
    frames: dict[str, Any] = dict(sites) if isinstance(sites, Mapping) else {f"site{i}": f for i, f in enumerate(sites)}
    spec = make_spec(list(frames.values()), group, columns, nonnormal, grids, equal_var, levels)
    return run_protocol(TableOneProtocol(spec, min_count=min_count), {s: (f, spec) for s, f in frames.items()})
