"""Federated confusion-matrix metrics, calibration and decision curves.

* :class:`BinaryMetricsProtocol` (1 round): each site sends ``tp, fp, tn, fn``; exact. A site
  with a cell ``0 < count < min_count`` (or such a class) is excluded (recorded).
* :class:`CalibrationProtocol` (1 + Newton rounds): round 1 sends per-bin ``count``,
  ``sum prob`` and ``sum y`` (a site's bin with ``0 <`` patients, cases or non-cases
  ``< min_count`` is withheld and recorded; the table and ECE then describe the other patients),
  the Brier sum, ``sum logit`` / ``sum logit**2`` (to detect constant predictions) and the first
  Newton terms of the two recalibration models; later rounds only Newton terms. Brier, slope and
  intercepts are exact (same solver as pooled).
* :class:`NetBenefitProtocol` (1 round): each site sends the cells of its class-conditional
  histograms on the grid whose edges are the thresholds themselves, so "prob >= t" is decided
  exactly from bins. Without merging the decision curve is exact; with merged cells a cell
  straddling ``t`` counts half and ``bound["model"][i] = (0.5 * unresolved_pos + 0.5 *
  unresolved_neg * t / (1 - t)) / n`` bounds the error at threshold ``i``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ._checks import DEFAULT_MIN_COUNT, as_binary, as_probabilities, as_scores, small
from .classification import (
    calibration_bin_index,
    calibration_table,
    check_thresholds,
    confusion_counts,
    is_constant,
    logit_clipped,
    metrics_from_counts,
    net_benefit_frame,
)
from .histogram import Cells, Grid
from .logistic import NewtonSolver, newton_terms
from .protocol import (
    EXCLUDED_CELL,
    EXCLUDED_CLASS,
    MERGED,
    WITHHELD_BIN,
    FederatedProtocol,
    Final,
    Params,
    Summary,
    run_protocol,
    site_min_count,
)
from .results import BinaryMetrics, CalibrationResult, Federated

logger = logging.getLogger(__name__)

SiteData = tuple[np.ndarray, np.ndarray]
Sites = Sequence[SiteData] | Mapping[str, SiteData]


def _included(summaries: Mapping[str, Summary]) -> list[str]:
    return [s for s, v in summaries.items() if not int(v.get("excluded", 0))]


class BinaryMetricsProtocol(FederatedProtocol):
    """Confusion counts at ``threshold``; site data ``(y_true, prob)``."""

    name = "binary_metrics"

    def __init__(self, threshold: float = 0.5, *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(min_count=min_count)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        self.threshold = float(threshold)

    def start(self) -> Params:
        return {"round": 1, "min_count": self.min_count, "threshold": self.threshold}

    @staticmethod
    def site_step(data: SiteData, params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        k = site_min_count(params, min_count)
        y = as_binary(data[0], site=site)
        p = as_scores(data[1], y.size, "prob", site)
        tp, fp, tn, fn = confusion_counts(y, p, float(params["threshold"]))
        out: Summary = {"round": 1, "min_count": k}
        if small(tp + fn, k) or small(fp + tn, k):
            return {**out, "excluded": 1, "supp.binary_metrics": EXCLUDED_CLASS}
        if small(np.array([tp, fp, tn, fn]), k):
            return {**out, "excluded": 1, "supp.binary_metrics": EXCLUDED_CELL}
        return {**out, "excluded": 0, "tp": tp, "fp": fp, "tn": tn, "fn": fn}

    def server_step(self, summaries: Mapping[str, Summary]) -> Final:
        self.log_suppressions(summaries)
        inc = _included(summaries)
        if not inc:
            raise ValueError("every site was excluded from binary_metrics by disclosure control")
        c = {k: sum(int(summaries[s][k]) for s in inc) for k in ("tp", "fp", "tn", "fn")}
        return Final(metrics_from_counts(c["tp"], c["fp"], c["tn"], c["fn"], self.threshold))


class CalibrationProtocol(FederatedProtocol):
    """Calibration table, Brier, ECE, slope and intercepts; site data ``(y_true, prob)``."""

    name = "calibration"

    def __init__(self, n_bins: int = 10, tol: float = 1e-10, max_iter: int = 100,
                 *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(min_count=min_count)
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.slope = NewtonSolver(2, tol, max_iter, ("intercept", "logit_p"))
        self.citl = NewtonSolver(1, tol, max_iter, ("intercept",))
        self.included: list[str] | None = None
        self.first: dict[str, float | np.ndarray] = {}

    def _params(self) -> Params:
        self.round += 1
        p: Params = {"round": self.round, "min_count": self.min_count, "n_bins": self.n_bins}
        if not self.slope.converged:
            p["slope.beta"] = self.slope.beta.copy()
        if not self.citl.converged:
            p["citl.beta"] = self.citl.beta.copy()
        return p

    def start(self) -> Params:
        return self._params()

    @staticmethod
    def site_step(data: SiteData, params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        k = site_min_count(params, min_count)
        y = as_binary(data[0], site=site)
        p = as_probabilities(data[1], y.size, "prob", site)
        n1 = int(y.sum())
        out: Summary = {"round": int(params["round"]), "min_count": k}
        if small(n1, k) or small(y.size - n1, k):
            return {**out, "excluded": 1, "supp.calibration": EXCLUDED_CLASS}
        out["excluded"] = 0
        yf = y.astype(np.float64)
        lg = logit_clipped(p)
        if int(params["round"]) == 1:
            nb = int(params["n_bins"])
            b = calibration_bin_index(p, nb)
            count = np.bincount(b, minlength=nb).astype(np.float64)
            sum_y = np.bincount(b, yf, nb)
            bad = ((count > 0) & (count < k)) | ((sum_y > 0) & (sum_y < k)) | \
                  ((count - sum_y > 0) & (count - sum_y < k))
            keep = ~bad
            out.update({"bin.count": count * keep, "bin.sum_p": np.bincount(b, p, nb) * keep,
                        "bin.sum_y": sum_y * keep, "n": int(y.size), "n_pos": n1,
                        "brier_sum": float(((p - yf) ** 2).sum()), "logit_sum": float(lg.sum()),
                        "logit_sumsq": float(lg @ lg)})
            for i in np.flatnonzero(bad):
                out[f"supp.calibration.bin{i}"] = WITHHELD_BIN
        if "slope.beta" in params:
            g, h, ll = newton_terms(np.column_stack([np.ones(y.size), lg]), yf,
                                    np.asarray(params["slope.beta"], dtype=np.float64))
            out.update({"slope.grad": g, "slope.info": h, "slope.loglik": ll})
        if "citl.beta" in params:
            g, h, ll = newton_terms(np.ones((y.size, 1)), yf, np.asarray(params["citl.beta"], dtype=np.float64),
                                    offset=lg)
            out.update({"citl.grad": g, "citl.info": h, "citl.loglik": ll})
        return out

    def server_step(self, summaries: Mapping[str, Summary]) -> Params | Final:
        self.log_suppressions(summaries)
        if self.included is None:
            self.included = _included(summaries)
            inc = self.included
            if not inc:
                raise ValueError("every site was excluded from calibration by disclosure control")
            tot = {k: sum(np.asarray(summaries[s][k], dtype=np.float64) for s in inc)
                   for k in ("bin.count", "bin.sum_p", "bin.sum_y", "brier_sum", "logit_sum", "logit_sumsq")}
            n = sum(int(summaries[s]["n"]) for s in inc)
            n1 = sum(int(summaries[s]["n_pos"]) for s in inc)
            if n1 in (0, n):
                raise ValueError(f"the included sites {inc} hold a single outcome class; calibration "
                                 "slope and intercept are undefined")
            bins, ece = calibration_table(tot["bin.count"], tot["bin.sum_p"], tot["bin.sum_y"])
            self.first = {"bins": bins, "ece": ece, "brier": float(tot["brier_sum"]) / n}
            if is_constant(n, float(tot["logit_sum"]), float(tot["logit_sumsq"])):
                logger.warning("all predicted probabilities are equal; calibration slope is NaN")
                self.slope.converged = True
                self.slope.beta = np.full(2, np.nan)
        missing = [s for s in self.included if int(summaries.get(s, {}).get("excluded", 1))]
        if missing:
            raise ValueError(f"site(s) {missing} stopped answering")
        for key, solver in (("slope", self.slope), ("citl", self.citl)):
            if not solver.converged:
                solver.update(sum(np.asarray(summaries[s][f"{key}.grad"]) for s in self.included),
                              sum(np.asarray(summaries[s][f"{key}.info"]) for s in self.included),
                              sum(float(summaries[s][f"{key}.loglik"]) for s in self.included))
        if self.slope.converged and self.citl.converged:
            f = self.first
            return Final(CalibrationResult(f["bins"], f["brier"], f["ece"], float(self.slope.beta[1]),
                                           float(self.citl.beta[0]), float(self.slope.beta[0])))
        return self._params()


def threshold_grid(thresholds: np.ndarray) -> Grid:
    """Grid whose bin edges are 0, the thresholds and just above 1 (``p >= t`` <=> bin >= t's bin)."""
    t = check_thresholds(thresholds)
    return Grid.from_edges(np.unique(np.concatenate([[0.0], t, [np.nextafter(1.0, 2.0)]])))


class NetBenefitProtocol(FederatedProtocol):
    """Decision curve from threshold-grid histograms; site data ``(y_true, prob)``."""

    name = "net_benefit"

    def __init__(self, thresholds: np.ndarray, *, min_count: int = DEFAULT_MIN_COUNT) -> None:
        super().__init__(min_count=min_count)
        self.thresholds = check_thresholds(thresholds)
        self.grid = threshold_grid(self.thresholds)

    def start(self) -> Params:
        return {"round": 1, "min_count": self.min_count, "grid.edges": self.grid.edges}

    @staticmethod
    def site_step(data: SiteData, params: Params, *, site: str | None = None,
                  min_count: int = DEFAULT_MIN_COUNT) -> Summary:
        k = site_min_count(params, min_count)
        y = as_binary(data[0], site=site)
        p = as_probabilities(data[1], y.size, "prob", site)
        n1 = int(y.sum())
        out: Summary = {"round": 1, "min_count": k}
        if small(n1, k) or small(y.size - n1, k):
            return {**out, "excluded": 1, "supp.net_benefit": EXCLUDED_CLASS}
        grid = Grid.from_edges(np.asarray(params["grid.edges"], dtype=np.float64))
        b = grid.bin(p, "prob", site)
        out.update({"excluded": 0, "n_pos": n1, "n_neg": int(y.size - n1)})
        for c, mask in (("pos", y == 1), ("neg", y == 0)):
            cells, merged = Cells.from_bins(b[mask], grid.n_bins, k)
            out.update(cells.to_summary(c))
            if merged:
                out[f"supp.net_benefit.{c}"] = MERGED
        return out

    def server_step(self, summaries: Mapping[str, Summary]) -> Final:
        self.log_suppressions(summaries)
        inc = _included(summaries)
        if not inc:
            raise ValueError("every site was excluded from net_benefit by disclosure control")
        nb = self.grid.n_bins
        pos = Cells.concat([Cells.from_summary(summaries[s], "pos", nb) for s in inc], nb)
        neg = Cells.concat([Cells.from_summary(summaries[s], "neg", nb) for s in inc], nb)
        b = np.searchsorted(self.grid.edges, self.thresholds)
        tp_s, tp_p = pos.at_or_above(b)
        fp_s, fp_p = neg.at_or_above(b)
        n = pos.n + neg.n
        w = self.thresholds / (1 - self.thresholds)
        frame = net_benefit_frame(self.thresholds, (tp_s + tp_p) / 2, (fp_s + fp_p) / 2, n, pos.n)
        return Final(frame, {"model": (0.5 * (tp_p - tp_s) + 0.5 * (fp_p - fp_s) * w) / n})


def federated_binary_metrics(sites: Sites, threshold: float = 0.5,
                             min_count: int = DEFAULT_MIN_COUNT) -> Federated[BinaryMetrics]:
    """Federated :func:`shared.stats.binary_metrics`; one ``(y_true, prob)`` per site."""
    return run_protocol(BinaryMetricsProtocol(threshold, min_count=min_count), sites)


def federated_calibration(sites: Sites, n_bins: int = 10,
                          min_count: int = DEFAULT_MIN_COUNT) -> Federated[CalibrationResult]:
    """Federated :func:`shared.stats.calibration`; one ``(y_true, prob)`` per site."""
    return run_protocol(CalibrationProtocol(n_bins, min_count=min_count), sites)


def federated_net_benefit(sites: Sites, thresholds: np.ndarray,
                          min_count: int = DEFAULT_MIN_COUNT) -> Federated[pd.DataFrame]:
    """Federated :func:`shared.stats.net_benefit`; ``bound["model"]`` has shape (len(thresholds),)."""
    return run_protocol(NetBenefitProtocol(thresholds, min_count=min_count), sites)
