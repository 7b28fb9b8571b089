"""Evaluation of the deep-learning signatures from federated statistics (no patient row leaves a site).

For every backbone: AUC with its DeLong 95% CI on each training site's test split, on each external
site, and pooled over all training sites' test splits and over all external sites, as if the
patients were in one place (``shared.stats.ROCProtocol``: histograms on a 10001-bin grid, then
DeLong placement sums). Disclosure control is the run's ``privacy.min_cell_count``; what it
suppressed is listed in the table's ``note`` column.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from shared.config import RectalFLConfig
from shared.queries import Query, Transport, run_queries
from shared.stats import ROCProtocol

logger = logging.getLogger(__name__)

COLUMNS = ["backbone", "site", "split", "n_pos", "n_neg", "auc", "lo", "hi", "bound", "note"]
POOLED_TEST = "pooled (training sites)"
POOLED_EXTERNAL = "pooled (external sites)"


def signature_auc_queries(keys: list[str], roles: dict[str, str], min_count: int) -> list[Query]:
    train = sorted(s for s, r in roles.items() if r == "train")
    external = sorted(s for s, r in roles.items() if r == "external")
    cohorts: list[tuple[str, list[str], str]] = [(s, [s], "test") for s in train]
    cohorts += [(s, [s], "external") for s in external]
    if len(train) > 1:
        cohorts.append((POOLED_TEST, train, "test"))
    if len(external) > 1:
        cohorts.append((POOLED_EXTERNAL, external, "external"))
    queries = []
    for key in keys:
        for name, sites, split in cohorts:
            queries.append(Query(qid=f"{key}@{name}@{split}", protocol=ROCProtocol(1, min_count=min_count),
                                 columns=[key], splits=[split], sites=sites))
    return queries


def queries_to_table(queries: list[Query]) -> pd.DataFrame:
    rows = []
    for q in queries:
        key, site, split = q.qid.split("@")
        row = {"backbone": key, "site": site, "split": split, "n_pos": 0, "n_neg": 0, "auc": np.nan, "lo": np.nan,
               "hi": np.nan, "bound": np.nan, "note": ""}
        if q.final is not None:
            r = q.final.result
            row.update(n_pos=int(r.n_pos), n_neg=int(r.n_neg), auc=float(r.auc), lo=float(r.lo), hi=float(r.hi),
                       bound=float(q.final.bound.get("auc", 0.0)))
        notes = [f"{s.site}: {s.reason}" for s in q.suppressed]
        if q.dropped:
            notes.append(f"without {', '.join(q.dropped)} (no answer)")
        if q.error:
            notes.append(q.error)
        row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_signatures(transport: Transport, cfg: RectalFLConfig, roles: dict[str, str]) -> pd.DataFrame:
    """Run the AUC queries through ``transport`` and return the signature AUC table."""
    from shared.models import signature_keys

    queries = signature_auc_queries(signature_keys(cfg), roles, cfg.privacy.min_cell_count)
    run_queries(queries, transport)
    table = queries_to_table(queries)
    missing = [q for q in queries if q.error]
    if missing:
        logger.warning("%d of %d AUCs not available (see the 'note' column of signature_auc.csv), e.g. %s: %s",
                       len(missing), len(queries), missing[0].qid, missing[0].error)
    return table
