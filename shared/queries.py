"""Batched federated-statistics queries over a site's local signature table.

A *query* is one :mod:`shared.stats` protocol (e.g. ``roc``) applied to columns of the site's
``signatures.csv`` restricted to some splits, answered by a chosen set of sites::

    Query(qid="pre_t2w|site_a|test", protocol=ROCProtocol(...), columns=["pre_t2w"],
          splits=["test"], sites=["site_a"])

Many queries travel together: each round the server sends a site the params of every unfinished
query that involves it (one message), and the site answers them all (one reply). Payloads are
flat ``{qid|key: value}`` dicts of numeric arrays and scalars, so they map onto one Flower
ArrayRecord + MetricRecord; the query *specs* (protocol name, columns, splits) travel as JSON.

The same runner drives Flower messages (``server.orchestrator``) and in-process sites (baselines,
tests) through a ``transport`` callable, so both paths compute identical numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shared.fusion import FusionSVMProtocol
from shared.stats import PROTOCOLS, FederatedProtocol, Final, Grid, Suppression, TableSpec

#: Every protocol a query may name (the statistics engine's plus the fusion SVM).
QUERY_PROTOCOLS: dict[str, type[FederatedProtocol]] = {**PROTOCOLS, FusionSVMProtocol.name: FusionSVMProtocol}

logger = logging.getLogger(__name__)

SEP = "|"
Payload = dict[str, Any]  # {"spec": {qid: spec}, "values": {qid|key: ndarray|int|float}}


@dataclass
class Query:
    qid: str
    protocol: FederatedProtocol
    columns: list[str]
    splits: list[str]
    sites: list[str]
    params: dict[str, Any] | None = None
    final: Final | None = None
    suppressed: list[Suppression] = field(default_factory=list)
    error: str | None = None
    dropped: list[str] = field(default_factory=list)
    """Sites that did not answer the first round, hence are not in the result."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More of the agreed spec, JSON-able (e.g. ``{"table": table_spec_to_json(spec)}`` for table_one)."""

    def spec(self) -> dict[str, Any]:
        return {"protocol": self.protocol.name, "columns": self.columns, "splits": self.splits, **self.extra}


def table_spec_to_json(spec: TableSpec) -> dict[str, Any]:
    """A :class:`TableSpec` as JSON-able dict (grids as edges + points)."""
    return {"group": spec.group, "groups": list(spec.groups), "columns": list(spec.columns),
            "levels": {k: list(v) for k, v in spec.levels.items()}, "nonnormal": list(spec.nonnormal),
            "grids": {k: {"edges": g.edges.tolist(), "points": g.points.tolist()} for k, g in spec.grids.items()},
            "equal_var": spec.equal_var}


def table_spec_from_json(d: Mapping[str, Any]) -> TableSpec:
    return TableSpec(d["group"], tuple(d["groups"]), tuple(d["columns"]), {k: list(v) for k, v in d["levels"].items()},
                     tuple(d["nonnormal"]),
                     {k: Grid(np.asarray(g["edges"]), np.asarray(g["points"])) for k, g in d["grids"].items()},
                     bool(d["equal_var"]))


def site_data(protocol: str, rows: pd.DataFrame, cols: list[str], spec: Mapping[str, Any]) -> tuple:
    """The local data a protocol's ``site_step`` takes, from the rows of the site table.

    ``table_one`` gets the rows with a label (missing values are its business); the model-fitting
    protocols get rows complete in the label and every column (a row with a gap is left out and
    counted by the protocol's n); the score protocols get ``(y, column, ...)``.
    """
    if protocol == "table_one":
        tspec = table_spec_from_json(spec["table"])
        return rows.dropna(subset=["label"]).assign(label=lambda d: d["label"].astype(int)), tspec
    rows = rows.dropna(subset=["label", *cols])
    y = rows["label"].to_numpy(dtype=float).astype(int)
    if protocol in ("logistic", "select_predictors"):
        return rows[cols].reset_index(drop=True).astype(float), y
    return (y, *(rows[c].to_numpy(dtype=float) for c in cols))


def _prefix(qid: str, d: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{qid}{SEP}{k}": v for k, v in d.items()}


def _unprefix(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for full, v in values.items():
        qid, _, key = full.rpartition(SEP)
        out.setdefault(qid, {})[key] = v
    return out


def answer_queries(table: pd.DataFrame, specs: Mapping[str, Mapping[str, Any]], values: Mapping[str, Any], *,
                   site: str, min_count: int) -> dict[str, Any]:
    """Site side: run each requested protocol step on the local table.

    Parameters
    ----------
    table : DataFrame
        The site's signature table (``patient_id, split, label, <signature columns>``); never sent.
    specs : mapping qid -> {"protocol", "columns", "splits"}
    values : mapping ``qid|key`` -> params from the server

    Returns
    -------
    dict
        ``qid|key`` -> summary values (counts, sums, histogram cells); per-query failures are
        reported under ``qid|error`` = 1 and logged on site.
    """
    params = _unprefix(values)
    out: dict[str, Any] = {}
    for qid, spec in specs.items():
        proto = QUERY_PROTOCOLS.get(str(spec["protocol"]))
        if proto is None:
            raise ValueError(f"unknown statistics protocol {spec['protocol']!r}; known: {sorted(QUERY_PROTOCOLS)}")
        cols = list(spec["columns"])
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"site {site}: signature column(s) {missing} not found")
        rows = table[table["split"].isin(list(spec["splits"]))]
        data = site_data(str(spec["protocol"]), rows, cols, spec)
        p = {k: (np.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in params.get(qid, {}).items()}
        summary = proto.site_step(data, p, site=site, min_count=min_count)
        out.update(_prefix(qid, summary))
    return out


Transport = Callable[[dict[str, Payload]], dict[str, dict[str, Any]]]
"""``{site: payload}`` -> ``{site: reply values}``; a site missing from the result failed."""


def run_queries(queries: list[Query], transport: Transport, *, max_rounds: int = 50) -> list[Query]:
    """Server side: drive all queries to completion, batching each round's messages per site."""
    for q in queries:
        q.params = q.protocol.start()
    for _ in range(max_rounds):
        pending = [q for q in queries if q.final is None and q.error is None]
        if not pending:
            return queries
        payloads: dict[str, Payload] = {}
        for q in pending:
            for s in q.sites:
                p = payloads.setdefault(s, {"spec": {}, "values": {}})
                p["spec"][q.qid] = q.spec()
                p["values"].update(_prefix(q.qid, q.params or {}))
        replies = transport(payloads)
        by_site = {s: _unprefix(v) for s, v in replies.items()}
        for q in pending:
            missing = [s for s in q.sites if s not in by_site]
            if missing and q.protocol.round <= 1 and len(missing) < len(q.sites):
                # A site that fails before contributing anything is left out, and that is said.
                q.sites = [s for s in q.sites if s not in missing]
                q.dropped.extend(missing)
            elif missing:
                q.error = f"no answer from {', '.join(missing)}"
                continue
            summaries = {s: {k: (np.asarray(v) if isinstance(v, np.ndarray | list) else v)
                             for k, v in by_site[s].get(q.qid, {}).items()} for s in q.sites}
            try:
                res = q.protocol.server_step(summaries)
            except ValueError as exc:  # e.g. every site excluded by disclosure control, one class absent
                q.error = str(exc)
                continue
            if isinstance(res, Final):
                q.final = res
                q.suppressed = list(q.protocol.suppressed)
            else:
                q.params = res
    for q in queries:
        if q.final is None and q.error is None:
            q.error = f"did not finish within {max_rounds} rounds"
    return queries


def local_transport(tables: Mapping[str, pd.DataFrame], min_count: int) -> Transport:
    """In-process sites (baselines, tests): answer from tables held in memory."""

    def send(payloads: dict[str, Payload]) -> dict[str, dict[str, Any]]:
        return {s: answer_queries(tables[s], p["spec"], p["values"], site=s, min_count=min_count)
                for s, p in payloads.items()}

    return send
