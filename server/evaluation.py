"""Evaluation of the deep-learning signatures from site-computed statistics (no patient row leaves a site).

For every backbone: AUC with its DeLong 95% CI pooled over the training sites' test splits and over
the external sites, as if the patients were in one place, and per site where that site's own
policy releases numbers about it alone (``release_site_figures``). One query per cohort covers
every backbone (:class:`shared.stats.sc_roc.ROCSite`: exact from the pooled fine-grid histograms
the sites hold; ``bound`` is its certified distance to the AUC of the raw scores). What disclosure
control or a site's policy withheld is in the table's ``note`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from shared.config import RectalFLConfig
from shared.stats.sc_roc import ROCSite
from shared.stats_driver import SiteQuery

logger = logging.getLogger(__name__)

COLUMNS = ["backbone", "site", "split", "n_pos", "n_neg", "auc", "lo", "hi", "bound", "note"]
POOLED_TEST = "pooled (training sites)"
POOLED_EXTERNAL = "pooled (external sites)"

StatsRun = Callable[[list[SiteQuery]], list[SiteQuery]]
"""Runs site-computed queries to completion (``shared.stats_driver.run_site_queries`` bound to a transport)."""


def query_note(q: SiteQuery, column: str | None = None, *, curves: bool = True) -> str:
    """What a reader needs to know about one query's numbers: withheld parts, refusals, dropouts, errors.

    ``column``: only the withheld items about that column (or about none in particular);
    ``curves=False`` leaves out the coarsening of released curves (it does not change the numbers).
    """
    notes = []
    rel = q.released or {}
    others = [c for c in q.columns if c != column] if column is not None else []
    for w in rel.get("withheld", []):
        if not isinstance(w, Mapping):
            continue
        quantity = str(w.get("quantity", ""))
        if any(quantity.endswith(f".{c}") or f".{c}." in quantity for c in others):
            continue
        if not curves and quantity.startswith("curve."):
            continue
        notes.append(f"{quantity}: {w.get('reason', '')}".strip(": "))
    notes += [f"{s} refused ({r.get('rule', '?')}): {r.get('reason', '')}" for s, r in sorted(q.refused.items())]
    others = [s for s in q.dropped if s not in q.refused]
    if others:
        why = "; ".join(f"{s}: {q.failures[s]}" for s in others if q.failures.get(s))
        notes.append(f"without {', '.join(others)}" + (f" ({why})" if why else " (stopped answering)"))
    inc = rel.get("sites_included")
    if inc is not None and inc < len(q.participants):
        notes.append(f"{len(q.participants) - inc} site(s) excluded: fewer than k patients of a class of their own")
    if q.error and not q.refused and not q.ok:
        notes.append(q.error)
    return "; ".join(dict.fromkeys(n for n in notes if n))


def cohort_queries(keys: list[str], roles: Mapping[str, str], prefix: str = "sig") -> list[tuple[str, str, SiteQuery]]:
    """``(site label, split, query)`` for every cohort the signature table reports."""
    train = sorted(s for s, r in roles.items() if r == "train")
    external = sorted(s for s, r in roles.items() if r == "external")
    out = []
    for s in train:
        out.append((s, "test", SiteQuery(f"{prefix}.site.{s}", ROCSite(keys), "internal_test", keys, [s])))
    for s in external:
        out.append((s, "external", SiteQuery(f"{prefix}.site.{s}", ROCSite(keys), "external", keys, [s])))
    if len(train) > 1:
        out.append((POOLED_TEST, "test", SiteQuery(f"{prefix}.pooled.test", ROCSite(keys), "internal_test", keys,
                                                   train)))
    if len(external) > 1:
        out.append((POOLED_EXTERNAL, "external", SiteQuery(f"{prefix}.pooled.external", ROCSite(keys), "external",
                                                           keys, external)))
    return out


def signature_table(keys: list[str], cohorts: list[tuple[str, str, SiteQuery]]) -> pd.DataFrame:
    """The signature AUC table from answered cohort queries."""
    rows = []
    for site, split, q in cohorts:
        note = query_note(q)
        res = q.result if q.ok else None
        for key in keys:
            row = {"backbone": key, "site": site, "split": split, "n_pos": 0, "n_neg": 0, "auc": np.nan,
                   "lo": np.nan, "hi": np.nan, "bound": np.nan, "note": note}
            if res is not None and key in res.aucs:
                a = res.aucs[key]
                row.update(n_pos=int(a.n_pos), n_neg=int(a.n_neg), auc=float(a.auc), lo=float(a.lo), hi=float(a.hi),
                           bound=float(res.tie_bound.get(key, np.nan)))
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_signatures(run_stats: StatsRun, cfg: RectalFLConfig, roles: Mapping[str, str]) -> pd.DataFrame:
    """Run the AUC queries and return the signature AUC table."""
    from shared.models import signature_keys

    keys = signature_keys(cfg)
    cohorts = cohort_queries(keys, roles)
    run_stats([q for _, _, q in cohorts])
    table = signature_table(keys, cohorts)
    missing = [q for _, _, q in cohorts if not q.ok and len(q.participants) > 1]
    if missing:
        logger.warning("pooled AUCs not available for %s: %s", missing[0].qid, missing[0].error)
    return table
