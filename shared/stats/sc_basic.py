"""Basic site-computed protocols: class counts and per-class column sums (means and SDs).

``column_sums``: one round. Each site sends, per class (0, 1), the number of patients and the sums
and sums of squares of each column. Released: per class ``n`` and, per column, mean and SD, each
only when that class has at least ``k`` patients in the pooled cohort (else withheld, with why).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .sitecomputed import (
    BIG_SUM_SPEC,
    COUNT_SPEC,
    CohortData,
    SiteComputedProtocol,
    State,
    Withheld,
    register,
)


@register
class ColumnSumsProtocol(SiteComputedProtocol):
    """Pooled class counts, means and SDs of ``n_columns`` columns.

    Parameters
    ----------
    n_columns : int
        Number of columns the query names (1-64).
    """

    name: ClassVar[str] = "column_sums"
    max_rounds: ClassVar[int] = 1

    def __init__(self, n_columns: int = 1) -> None:
        super().__init__()
        if isinstance(n_columns, bool) or not isinstance(n_columns, int) or not 0 <= n_columns <= 64:
            raise ValueError(f"n_columns must be an integer in [0, 64], got {n_columns!r}")
        self._keep(n_columns=n_columns)

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        m = self.params["n_columns"]
        return {"n": {"shape": (2,), **COUNT_SPEC}, "s": {"shape": (2, m), **BIG_SUM_SPEC},
                "ss": {"shape": (2, m), **BIG_SUM_SPEC}}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        m = self.params["n_columns"]
        if data.X.shape[1] != m:
            raise ValueError(f"{self.name}: expected {m} column(s), got {data.X.shape[1]}")
        n = np.array([(data.y == c).sum() for c in (0, 1)], dtype=np.float64)
        s = np.stack([data.X[data.y == c].sum(axis=0) for c in (0, 1)]) if m else np.zeros((2, 0))
        ss = np.stack([(data.X[data.y == c] ** 2).sum(axis=0) for c in (0, 1)]) if m else np.zeros((2, 0))
        return {"n": n, "s": s, "ss": ss}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        return {**state, "round": 1, "n": np.asarray(totals["n"]), "s": np.asarray(totals["s"]),
                "ss": np.asarray(totals["ss"])}, True

    def release(self, state: State, min_count: int) -> dict[str, Any]:
        n, s, ss = np.asarray(state["n"]), np.asarray(state["s"]), np.asarray(state["ss"])
        out: dict[str, Any] = {"n": [], "mean": [], "sd": [], "withheld": []}
        for c in (0, 1):
            nc = int(round(n[c]))
            if 0 < nc < min_count:
                out["n"].append(None)
                out["mean"].append(None)
                out["sd"].append(None)
                out["withheld"].append(Withheld(f"class {c}", f"0 < n < k={min_count} pooled patients").to_json())
                continue
            out["n"].append(nc)
            if nc == 0:
                out["mean"].append(None)
                out["sd"].append(None)
                continue
            mean = s[c] / nc
            var = (ss[c] - nc * mean**2) / (nc - 1) if nc > 1 else np.full_like(mean, np.nan)
            out["mean"].append([float(v) for v in mean])
            out["sd"].append([float(v) for v in np.sqrt(np.maximum(var, 0.0))])
        return out
