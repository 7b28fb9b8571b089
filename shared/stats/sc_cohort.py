"""Site-computed cohort summary: the pooled number of positives and negatives of a cohort.

One round: each site adds ``[n_neg, n_pos]`` of the cohort's fixed patient set. Release: both
counts when each is >= ``k`` (they are the denominators the report shows); otherwise nothing but
``withheld`` (not even which class is small).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ._checks import check_min_count
from .sc_common import withheld
from .sitecomputed import COUNT_SPEC, CohortData, Released, SiteComputedProtocol, State, Withheld

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortSummary:
    """Release of :class:`CohortSummarySite`: ``n_pos``/``n_neg`` (None when withheld)."""

    n_pos: int | None
    n_neg: int | None
    withheld: tuple[Withheld, ...] = field(default_factory=tuple)

    @property
    def n(self) -> int | None:
        return None if self.n_pos is None or self.n_neg is None else self.n_pos + self.n_neg


class CohortSummarySite(SiteComputedProtocol):
    """Pooled class counts of the cohort (no parameters)."""

    name: ClassVar[str] = "cohort_summary"
    max_rounds: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self._keep()

    def layout(self, state: State) -> dict[str, dict[str, Any]]:
        return {"n": {"shape": (2,), **COUNT_SPEC}}

    def local(self, data: CohortData, state: State) -> dict[str, np.ndarray]:
        y = data.y
        return {"n": np.array([(y == 0).sum(), (y == 1).sum()], dtype=np.float64)}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        n = np.rint(np.asarray(totals["n"])).astype(np.int64)
        return {"round": 1, "n_neg": int(n[0]), "n_pos": int(n[1])}, True

    def release(self, state: State, min_count: int) -> Released:
        k = check_min_count(min_count)
        n0, n1 = int(state["n_neg"]), int(state["n_pos"])
        if n0 < k or n1 < k:
            return {"protocol": self.name, "released": False, "withheld": [withheld(
                "cohort_summary", f"the cohort has fewer than k={k} positives or negatives")]}
        return {"protocol": self.name, "released": True, "n_pos": n1, "n_neg": n0, "withheld": []}

    def result(self, released: Released) -> CohortSummary:
        wh = tuple(Withheld(w["quantity"], w["reason"]) for w in released.get("withheld", []))
        if not released.get("released"):
            return CohortSummary(None, None, wh)
        return CohortSummary(int(released["n_pos"]), int(released["n_neg"]), wh)
