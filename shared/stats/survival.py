"""Survival statistics: pooled references and site-computed federated protocols.

Methods (pooled function / federated protocol)
---------------------------------------------
* Kaplan-Meier on binned times with exponential-Greenwood CIs (as lifelines), and the k-group
  log-rank test: :func:`kaplan_meier`, :func:`logrank_test` / :class:`KaplanMeierProtocol`.
  Times are binned on a **fixed, config-given grid** ``time_edges`` (never data-driven): bin ``j``
  is ``(e_j, e_{j+1}]`` (the first also holds ``e_0``) and a patient's binned time is the bin's
  right edge. Follow-up past the last edge is censored there (administrative censoring at the
  horizon). One round: per group and bin, event and censoring counts (sums). Exact on the
  binned times.
* Site-stratified Cox proportional hazards by Newton-Raphson (Breslow or Efron ties; step
  halving): :func:`cox_ph` / :class:`CoxPHProtocol`. Each stratum lives inside one site, so the
  log partial likelihood, score and information are sums over sites of per-site terms: exact.
  Uses the raw (unbinned) times, which never leave the site.
* Time-dependent AUC for t-year survival, cumulative/dynamic definition (cases: event by ``t``;
  controls: still event-free after ``t``) with Uno's IPCW weights ``1 / G(T_i-)`` (``G``: the
  Kaplan-Meier of the censoring distribution on the binned times), computed on a shared score
  grid, with a bootstrap-free DeLong-type variance and a paired comparison of scores:
  :func:`time_dependent_auc` / :class:`TimeDependentAUCProtocol`. Exact for the grid-snapped
  scores; :func:`time_dependent_auc` also returns the certified bound against unsnapped scores.

Disclosure control (in ``release``, on pooled counts, threshold ``k = min_count``): every
released count covers 0 or >= k patients. KM: adjacent bins are merged until each block's
event and censoring counts are 0 or >= k (so every at-risk count is too), a tail that cannot be
made so is merged backwards; a group with 0 < n < k is withheld. Log-rank: withheld when a
group's size or events are 0 < x < k. Cox: withheld when patients, events, censored, or the
patients / events in a level of a binary covariate are 0 < x < k. Time-dependent AUC: withheld
when cases or controls are 0 < x < k.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from .sc_legacy import (
    Contribution,
    SiteComputedProtocol,
    State,
    as_count,
    check_consistent,
    small_count,
    withheld,
)

logger = logging.getLogger(__name__)

TIES = ("breslow", "efron")


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SurvivalData:
    """One site's (or the pooled) survival data.

    Parameters
    ----------
    time : array-like of shape (n_samples,)
        Follow-up time (e.g. years to recurrence or last contact), >= 0.
    event : array-like of shape (n_samples,)
        1 = event (recurrence/death) at ``time``, 0 = censored.
    group : array-like of shape (n_samples,), optional
        Group label per patient (e.g. subtype) for Kaplan-Meier / log-rank.
    covariates : array-like of shape (n_samples, n_covariates), optional
        Cox covariates.
    scores : array-like of shape (n_samples, n_scores), optional
        Risk scores for the time-dependent AUC (higher = higher risk).
    stratum : array-like of shape (n_samples,), optional
        Extra Cox strata inside the site (the site is always a stratum of its own).
    """

    time: np.ndarray
    event: np.ndarray
    group: np.ndarray | None = None
    covariates: np.ndarray | None = None
    scores: np.ndarray | None = None
    stratum: np.ndarray | None = None

    def __post_init__(self) -> None:
        t = np.asarray(self.time, dtype=np.float64)
        if t.ndim != 1:
            raise ValueError(f"time must be 1-dimensional, got shape {t.shape}")
        if not np.all(np.isfinite(t)):
            raise ValueError("time contains NaN or infinite values; fix or exclude those patients")
        if t.size and t.min() < 0:
            raise ValueError("time contains negative values; follow-up time must be >= 0")
        e = np.asarray(self.event)
        if e.shape != t.shape:
            raise ValueError(f"event has shape {e.shape}, time has {t.shape}")
        if e.dtype == bool:
            e = e.astype(np.int8)
        if e.size and not np.isin(e, (0, 1)).all():
            raise ValueError("event must contain only 0 (censored) and 1 (event)")
        object.__setattr__(self, "time", t)
        object.__setattr__(self, "event", e.astype(np.int8))
        n = t.shape[0]
        for name in ("group", "stratum"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v)
                if v.shape != (n,):
                    raise ValueError(f"{name} must have shape ({n},), got {v.shape}")
                object.__setattr__(self, name, v)
        for name in ("covariates", "scores"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v, dtype=np.float64)
                if v.ndim == 1:
                    v = v[:, None]
                if v.ndim != 2 or v.shape[0] != n:
                    raise ValueError(f"{name} must have shape ({n}, k), got {v.shape}")
                if not np.all(np.isfinite(v)):
                    raise ValueError(f"{name} contains NaN or infinite values; impute or exclude first")
                object.__setattr__(self, name, v)

    @property
    def n(self) -> int:
        return int(self.time.shape[0])


def as_survival_data(data: SurvivalData | Mapping[str, Any]) -> SurvivalData:
    """Accept a :class:`SurvivalData` or a mapping with the same field names."""
    if isinstance(data, SurvivalData):
        return data
    if isinstance(data, Mapping):
        known = {"time", "event", "group", "covariates", "scores", "stratum"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown survival fields {sorted(unknown)}; expected some of {sorted(known)}")
        return SurvivalData(**data)
    raise TypeError(f"expected SurvivalData or a mapping, got {type(data).__name__}")


# --------------------------------------------------------------------------------------------
# Time grid
# --------------------------------------------------------------------------------------------

def check_time_edges(time_edges: Sequence[float]) -> np.ndarray:
    """Validate a fixed time grid: finite, strictly increasing, starting at 0, >= 2 edges."""
    e = np.asarray(time_edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise ValueError(f"time_edges must be a 1-d grid with at least 2 edges, got {e!r}")
    if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError("time_edges must be finite and strictly increasing")
    if e[0] != 0.0:
        raise ValueError(f"time_edges must start at 0, got {e[0]}")
    return e


def bin_times(time: np.ndarray, event: np.ndarray, time_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bin index of each time on the grid, and the event indicator after horizon censoring.

    Bin ``j`` is ``(e_j, e_{j+1}]`` (bin 0 also holds ``e_0``). A time past the last edge is
    put in the last bin and censored (its event is after the horizon).

    Returns
    -------
    idx : ndarray of shape (n,), int
    event : ndarray of shape (n,), int8
    """
    edges = check_time_edges(time_edges)
    t = np.asarray(time, dtype=np.float64)
    idx = np.searchsorted(edges, t, side="left") - 1
    idx = np.maximum(idx, 0)
    beyond = t > edges[-1]
    idx = np.minimum(idx, edges.size - 2)
    ev = np.asarray(event).astype(np.int8).copy()
    ev[beyond] = 0
    return idx.astype(np.int64), ev


def binned_times(time: np.ndarray, event: np.ndarray, time_edges: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(binned time, event)``: each time replaced by its bin's right edge (see :func:`bin_times`)."""
    edges = check_time_edges(time_edges)
    idx, ev = bin_times(time, event, edges)
    return edges[idx + 1], ev


def _exit_counts(idx: np.ndarray, ev: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.bincount(idx[ev == 1], minlength=n_bins).astype(np.float64)
    c = np.bincount(idx[ev == 0], minlength=n_bins).astype(np.float64)
    return d, c


# --------------------------------------------------------------------------------------------
# Kaplan-Meier and log-rank (pooled references)
# --------------------------------------------------------------------------------------------

def km_from_counts(events: np.ndarray, censored: np.ndarray, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Kaplan-Meier from per-bin event and censoring counts (censored at a bin stay at risk for it).

    Returns ``n_at_risk``, ``events``, ``censored``, ``survival``, ``ci_lower``, ``ci_upper``
    (exponential Greenwood, as lifelines; 1.0 where undefined).
    """
    d = np.asarray(events, dtype=np.float64)
    c = np.asarray(censored, dtype=np.float64)
    n_total = d.sum() + c.sum()
    exits = d + c
    n = n_total - np.concatenate([[0.0], np.cumsum(exits)[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(n > 0, d / np.where(n > 0, n, 1.0), 0.0)
        surv = np.cumprod(1.0 - frac)
        gw = np.where((n > 0) & (n > d), d / (n * (n - d)), 0.0)
        var = np.cumsum(gw)
        z = stats.norm.ppf(1 - alpha / 2)
        v = np.log(surv)
        lo = np.exp(-np.exp(np.log(-v) - z * np.sqrt(var) / v))
        hi = np.exp(-np.exp(np.log(-v) + z * np.sqrt(var) / v))
    lo = np.where(np.isnan(lo), 1.0, lo)
    hi = np.where(np.isnan(hi), 1.0, hi)
    return {"n_at_risk": n, "events": d, "censored": c, "survival": surv, "ci_lower": lo, "ci_upper": hi}


def kaplan_meier(time: np.ndarray, event: np.ndarray, time_edges: Sequence[float],
                 alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Pooled Kaplan-Meier on the binned times (one value per grid bin).

    Parameters
    ----------
    time, event : ndarray of shape (n_samples,)
    time_edges : sequence of float
        Fixed grid (see :func:`bin_times`).
    alpha : float
        1 - confidence level of the exponential-Greenwood interval.

    Returns
    -------
    dict
        ``time`` (the bins' right edges) and the arrays of :func:`km_from_counts`.
    """
    sd = SurvivalData(time, event)
    edges = check_time_edges(time_edges)
    idx, ev = bin_times(sd.time, sd.event, edges)
    d, c = _exit_counts(idx, ev, edges.size - 1)
    out = km_from_counts(d, c, alpha)
    out["time"] = edges[1:].copy()
    return out


def logrank_from_counts(events: np.ndarray, at_risk: np.ndarray) -> dict[str, Any]:
    """k-group log-rank test from per-group, per-bin events and at-risk counts.

    Parameters
    ----------
    events, at_risk : ndarray of shape (n_groups, n_bins)

    Returns
    -------
    dict
        ``chi2``, ``df``, ``p``, ``observed`` and ``expected`` events per group.
    """
    d = np.asarray(events, dtype=np.float64)
    n = np.asarray(at_risk, dtype=np.float64)
    d_tot = d.sum(axis=0)
    n_tot = n.sum(axis=0)
    ok = n_tot > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(ok, n / np.where(ok, n_tot, 1.0), 0.0)
        expected = (share * d_tot).sum(axis=1)
        fac = np.where(n_tot > 1, d_tot * (n_tot - d_tot) / np.where(n_tot > 1, n_tot - 1, 1.0), 0.0)
    g = d.shape[0]
    v = np.zeros((g, g))
    for j in np.flatnonzero(fac > 0):
        s = share[:, j]
        v += fac[j] * (np.diag(s) - np.outer(s, s))
    observed = d.sum(axis=1)
    used = np.flatnonzero(n.sum(axis=1) > 0)
    if used.size < 2:
        return {"chi2": float("nan"), "df": 0, "p": float("nan"), "observed": observed, "expected": expected}
    u = (observed - expected)[used[:-1]]
    vv = v[np.ix_(used[:-1], used[:-1])]
    chi2 = float(u @ np.linalg.pinv(vv) @ u)
    df = int(used.size - 1)
    return {"chi2": chi2, "df": df, "p": float(stats.chi2.sf(chi2, df)), "observed": observed,
            "expected": expected}


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray,
                 time_edges: Sequence[float]) -> dict[str, Any]:
    """Pooled k-group log-rank test on the binned times (groups in sorted label order)."""
    sd = SurvivalData(time, event, group=group)
    edges = check_time_edges(time_edges)
    idx, ev = bin_times(sd.time, sd.event, edges)
    labels = np.unique(sd.group)
    nb = edges.size - 1
    d = np.zeros((labels.size, nb))
    n = np.zeros((labels.size, nb))
    for gi, lab in enumerate(labels):
        sel = sd.group == lab
        dg, cg = _exit_counts(idx[sel], ev[sel], nb)
        d[gi] = dg
        n[gi] = sel.sum() - np.concatenate([[0.0], np.cumsum(dg + cg)[:-1]])
    out = logrank_from_counts(d, n)
    out["groups"] = labels.tolist()
    return out


def merge_blocks(events: np.ndarray, censored: np.ndarray, min_count: int) -> list[tuple[int, int]] | None:
    """Merge adjacent bins so that each block's events and censored are 0 or >= ``min_count``.

    Among all partitions of the grid into contiguous blocks that satisfy the rule, the one with
    the most blocks (finest released curve) is chosen by dynamic programming (O(bins^2)); ties go
    to the partition whose last block starts latest. Deterministic, so every site gets the same.

    Returns
    -------
    list of (start, stop) or None
        Half-open bin ranges covering all bins, or None when no partition satisfies the rule
        (0 < total events or total censored < ``min_count``).
    """
    d = np.concatenate([[0.0], np.cumsum(np.asarray(events, dtype=np.float64))])
    c = np.concatenate([[0.0], np.cumsum(np.asarray(censored, dtype=np.float64))])
    nb = d.size - 1
    best = np.full(nb + 1, -1, dtype=np.int64)
    prev = np.full(nb + 1, -1, dtype=np.int64)
    best[0] = 0
    for e in range(1, nb + 1):
        for s in range(e - 1, -1, -1):
            if best[s] < 0 or small_count([d[e] - d[s], c[e] - c[s]], min_count):
                continue
            if best[s] + 1 > best[e]:
                best[e], prev[e] = best[s] + 1, s
    if best[nb] < 0:
        return None
    blocks: list[tuple[int, int]] = []
    e = nb
    while e > 0:
        blocks.append((int(prev[e]), e))
        e = int(prev[e])
    return blocks[::-1]


# --------------------------------------------------------------------------------------------
# Kaplan-Meier + log-rank: federated
# --------------------------------------------------------------------------------------------

class KaplanMeierProtocol(SiteComputedProtocol):
    """Kaplan-Meier curves per group and the k-group log-rank test on a fixed time grid.

    One round: each site sends, per group and time bin, its event and censoring counts. Every
    site derives the pooled curves; the release merges bins under disclosure control (see the
    module docstring), and the log-rank test is computed on the full (unmerged) grid.

    Parameters
    ----------
    time_edges : sequence of float
        Fixed grid from config (starts at 0, strictly increasing).
    groups : sequence of labels, optional
        Group labels in the order to report (e.g. subtypes ``[0, 1, 2]``); None = one group.
    alpha : float
        1 - confidence level of the KM intervals.
    """

    name: ClassVar[str] = "kaplan_meier"

    def __init__(self, time_edges: Sequence[float], groups: Sequence[Any] | None = None,
                 alpha: float = 0.05) -> None:
        self.time_edges = check_time_edges(time_edges)
        self.groups = list(groups) if groups is not None else None
        if self.groups is not None and len(set(map(str, self.groups))) != len(self.groups):
            raise ValueError(f"groups must be distinct, got {self.groups!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)

    def params(self) -> dict[str, Any]:
        return {"time_edges": self.time_edges.tolist(),
                "groups": None if self.groups is None else [str(g) for g in self.groups], "alpha": self.alpha}

    @property
    def _n_groups(self) -> int:
        return 1 if self.groups is None else len(self.groups)

    def init_state(self) -> State:
        return {"round": 0}

    def _group_index(self, sd: SurvivalData) -> np.ndarray:
        if self.groups is None:
            return np.zeros(sd.n, dtype=np.int64)
        if sd.group is None:
            raise ValueError("group labels are missing but the protocol reports per group")
        lookup = {str(g): i for i, g in enumerate(self.groups)}
        labels = [str(g) for g in sd.group]
        bad = sorted({lab for lab in labels if lab not in lookup})
        if bad:
            raise ValueError(f"group labels {bad} are not among the configured groups {self.groups}")
        return np.array([lookup[lab] for lab in labels], dtype=np.int64)

    def local(self, data: Any, state: State) -> Contribution:
        sd = as_survival_data(data)
        gi = self._group_index(sd)
        idx, ev = bin_times(sd.time, sd.event, self.time_edges)
        nb = self.time_edges.size - 1
        d = np.zeros((self._n_groups, nb))
        c = np.zeros((self._n_groups, nb))
        np.add.at(d, (gi[ev == 1], idx[ev == 1]), 1.0)
        np.add.at(c, (gi[ev == 0], idx[ev == 0]), 1.0)
        return {"events": d, "censored": c}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        as_count(totals["events"], "events")
        as_count(totals["censored"], "censored")
        return {"round": 1}, True

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        d = as_count(totals["events"], "events").astype(np.float64)
        c = as_count(totals["censored"], "censored").astype(np.float64)
        labels = ["all"] if self.groups is None else [str(g) for g in self.groups]
        out: dict[str, Any] = {"method": "kaplan_meier", "time_unit_edges": self.time_edges.tolist(),
                               "curves": {}, "withheld": []}
        at_risk = np.zeros_like(d)
        for g, lab in enumerate(labels):
            n_g = d[g].sum() + c[g].sum()
            at_risk[g] = n_g - np.concatenate([[0.0], np.cumsum(d[g] + c[g])[:-1]])
            if n_g == 0:
                out["curves"][lab] = None
                out["withheld"].append(withheld(f"km.{lab}", "no patients in this group"))
                continue
            if small_count(n_g, min_count):
                out["curves"][lab] = None
                out["withheld"].append(withheld(f"km.{lab}", f"group has fewer than min_count={min_count} patients"))
                continue
            blocks = merge_blocks(d[g], c[g], min_count)
            if blocks is None:
                out["curves"][lab] = None
                out["withheld"].append(withheld(
                    f"km.{lab}", f"events or censored in the group are 1..{min_count - 1}: no curve can be released"))
                continue
            bd = np.array([d[g, s:e].sum() for s, e in blocks])
            bc = np.array([c[g, s:e].sum() for s, e in blocks])
            km = km_from_counts(bd, bc, self.alpha)
            merged = sum(1 for s, e in blocks if e - s > 1)
            if merged:
                out["withheld"].append(withheld(
                    f"km.{lab}", f"{merged} block(s) of adjacent time bins merged so that every event and "
                                 f"censoring count is 0 or >= min_count={min_count}"))
            out["curves"][lab] = {
                "time": [float(self.time_edges[e]) for _, e in blocks],
                "time_start": [float(self.time_edges[s]) for s, _ in blocks],
                **{k: km[k].tolist() for k in ("n_at_risk", "events", "censored", "survival", "ci_lower", "ci_upper")},
            }
        out["logrank"] = self._logrank_release(d, at_risk, labels, min_count, out["withheld"])
        return out

    def _logrank_release(self, d: np.ndarray, n: np.ndarray, labels: list[str], k: int,
                         log: list[dict[str, str]]) -> dict[str, Any] | None:
        if len(labels) < 2:
            return None
        sizes = n[:, 0]
        events = d.sum(axis=1)
        if small_count(sizes, k) or small_count(events, k):
            log.append(withheld("logrank", f"a group has 1..{k - 1} patients or events"))
            return None
        res = logrank_from_counts(d, n)
        return {"chi2": res["chi2"], "df": res["df"], "p": res["p"], "groups": labels,
                "n": sizes.tolist(), "observed": res["observed"].tolist(), "expected": res["expected"].tolist()}


# --------------------------------------------------------------------------------------------
# Cox proportional hazards
# --------------------------------------------------------------------------------------------

def _cox_stratum_terms(time: np.ndarray, event: np.ndarray, x: np.ndarray, beta: np.ndarray,
                       ties: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Log partial likelihood, score and information of one stratum (Breslow or Efron)."""
    p = x.shape[1]
    ll, grad, info = 0.0, np.zeros(p), np.zeros((p, p))
    if not event.any():
        return ll, grad, info
    eta = x @ beta
    shift = eta.max()
    r = np.exp(eta - shift)
    order = np.argsort(-time, kind="stable")
    t_s, e_s, x_s, r_s, eta_s = time[order], event[order], x[order], r[order], eta[order]
    c0 = np.cumsum(r_s)
    c1 = np.cumsum(r_s[:, None] * x_s, axis=0)
    c2 = np.cumsum(r_s[:, None, None] * (x_s[:, :, None] * x_s[:, None, :]), axis=0)
    uniq = np.unique(t_s[e_s == 1])
    for t in uniq:
        last = np.searchsorted(-t_s, -t, side="right") - 1  # last index with time >= t
        s0, s1, s2 = c0[last], c1[last], c2[last]
        dmask = (t_s == t) & (e_s == 1)
        dcount = int(dmask.sum())
        ll += float(eta_s[dmask].sum())
        grad += x_s[dmask].sum(axis=0)
        if ties == "breslow" or dcount == 1:
            ll -= dcount * (np.log(s0) + shift)
            m1 = s1 / s0
            grad -= dcount * m1
            info += dcount * (s2 / s0 - np.outer(m1, m1))
        else:
            rd = r_s[dmask]
            xd = x_s[dmask]
            s0d = rd.sum()
            s1d = (rd[:, None] * xd).sum(axis=0)
            s2d = (rd[:, None, None] * (xd[:, :, None] * xd[:, None, :])).sum(axis=0)
            for l_ in range(dcount):
                phi = l_ / dcount
                a0 = s0 - phi * s0d
                a1 = s1 - phi * s1d
                a2 = s2 - phi * s2d
                ll -= np.log(a0) + shift
                m1 = a1 / a0
                grad -= m1
                info += a2 / a0 - np.outer(m1, m1)
    return ll, grad, info


def cox_terms(data: SurvivalData, beta: np.ndarray, ties: str = "breslow") -> tuple[float, np.ndarray, np.ndarray]:
    """Log partial likelihood, score vector and information matrix summed over ``data``'s strata."""
    if data.covariates is None:
        raise ValueError("covariates are missing; the Cox model needs a covariate matrix")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    strata = np.zeros(data.n, dtype=np.int64) if data.stratum is None else np.unique(
        data.stratum.astype(str), return_inverse=True)[1]
    p = data.covariates.shape[1]
    ll, grad, info = 0.0, np.zeros(p), np.zeros((p, p))
    for s in np.unique(strata):
        sel = strata == s
        a, b, c = _cox_stratum_terms(data.time[sel], data.event[sel], data.covariates[sel], beta, ties)
        ll += a
        grad += b
        info += c
    return ll, grad, info


def _binary_level_counts(x: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Per covariate: patients with x==0, x==1, events with x==0, x==1 (shape (4, p))."""
    is0, is1 = (x == 0), (x == 1)
    ev = event.astype(bool)[:, None]
    return np.stack([is0.sum(0), is1.sum(0), (is0 & ev).sum(0), (is1 & ev).sum(0)]).astype(np.float64)


@dataclass(frozen=True)
class CoxFit:
    """A fitted Cox model (pooled reference output; the federated release has the same numbers)."""

    coef: np.ndarray
    se: np.ndarray
    loglik: float
    converged: bool
    iterations: int
    gradient_norm: float
    n: int
    events: int

    def table(self, names: Sequence[str], alpha: float = 0.05) -> dict[str, list[float]]:
        """Per covariate: coef, se, HR and its CI, Wald z and p."""
        return _cox_table(self.coef, self.se, alpha) | {"covariate": list(names)}


def _cox_table(coef: np.ndarray, se: np.ndarray, alpha: float) -> dict[str, list[float]]:
    z = stats.norm.ppf(1 - alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        wald = coef / se
    return {"coef": coef.tolist(), "se": se.tolist(), "hr": np.exp(coef).tolist(),
            "hr_ci_lower": np.exp(coef - z * se).tolist(), "hr_ci_upper": np.exp(coef + z * se).tolist(),
            "z": wald.tolist(), "p": (2 * stats.norm.sf(np.abs(wald))).tolist()}


class _Newton:
    """Newton-Raphson with step halving on a concave log-likelihood; pure state transitions.

    Used identically by the pooled reference and the federated protocol so that both take the
    same path (the test then checks the *sums*, not two optimisers).
    """

    @staticmethod
    def start(p: int) -> dict[str, Any]:
        return {"beta": [0.0] * p, "iteration": 0, "ll_prev": None, "step": None, "halvings": 0,
                "status": "running", "final": None}

    @staticmethod
    def step(st: dict[str, Any], ll: float, grad: np.ndarray, info: np.ndarray, *, max_iter: int,
             tol: float, max_halvings: int = 30) -> tuple[dict[str, Any], bool]:
        beta = np.asarray(st["beta"], dtype=np.float64)
        if not (np.isfinite(ll) and np.all(np.isfinite(grad)) and np.all(np.isfinite(info))):
            raise ValueError("log-likelihood, score or information total is not finite")
        scale = 1.0 + float(np.abs(info).max())
        check_consistent(bool(np.allclose(info, info.T, rtol=1e-8, atol=1e-10 * scale)), "information not symmetric")
        check_consistent(bool(np.linalg.eigvalsh((info + info.T) / 2).min() >= -1e-8 * scale),
                         "information not positive semi-definite")
        check_consistent(ll <= 1e-9 * (1.0 + abs(ll)), "log partial likelihood > 0")
        prev = st["ll_prev"]
        if prev is not None and ll < prev - 1e-12 * (1.0 + abs(prev)):
            if st["halvings"] >= max_halvings:
                st.update(status="step halving failed", final=_Newton._final(beta, ll, grad, info, st))
                return st, True
            half = np.asarray(st["step"]) / 2.0
            st.update(beta=(beta - half).tolist(), step=half.tolist(), halvings=st["halvings"] + 1)
            return st, False
        try:
            delta = np.linalg.solve(info, grad)
        except np.linalg.LinAlgError:
            st.update(status="singular information matrix (a covariate is constant within strata, "
                             "or perfectly separates events)", final=_Newton._final(beta, ll, grad, info, st))
            return st, True
        if not np.all(np.isfinite(delta)) or np.linalg.cond(info) > 1e14:
            st.update(status="singular information matrix (a covariate is constant within strata, "
                             "or perfectly separates events)", final=_Newton._final(beta, ll, grad, info, st))
            return st, True
        if float(np.max(np.abs(delta))) < tol:
            st.update(status="converged", final=_Newton._final(beta + delta, ll, grad, info, st))
            return st, True
        if st["iteration"] >= max_iter:
            st.update(status=f"not converged after {max_iter} iterations",
                      final=_Newton._final(beta, ll, grad, info, st))
            return st, True
        st.update(beta=(beta + delta).tolist(), step=delta.tolist(), ll_prev=ll, halvings=0,
                  iteration=st["iteration"] + 1)
        return st, False

    @staticmethod
    def _final(beta: np.ndarray, ll: float, grad: np.ndarray, info: np.ndarray, st: dict[str, Any]) -> dict[str, Any]:
        try:
            cov = np.linalg.inv(info)
            se = np.sqrt(np.clip(np.diag(cov), 0, None))
        except np.linalg.LinAlgError:
            se = np.full(beta.size, np.nan)
        return {"coef": beta.tolist(), "se": se.tolist(), "loglik": float(ll),
                "gradient_norm": float(np.linalg.norm(grad)), "iterations": int(st["iteration"])}


def cox_ph(data: SurvivalData, *, ties: str = "breslow", max_iter: int = 50, tol: float = 1e-10) -> CoxFit:
    """Pooled stratified Cox PH (strata = ``data.stratum``, e.g. the site), Newton-Raphson.

    Parameters
    ----------
    data : SurvivalData
        With ``covariates`` (n, p) and optionally ``stratum`` (n,).
    ties : {"breslow", "efron"}
    max_iter : int
        Newton iterations at most.
    tol : float
        Converged when every component of the Newton step is below ``tol``; the reported
        coefficients include that last step.

    Returns
    -------
    CoxFit
    """
    sd = as_survival_data(data)
    if sd.covariates is None:
        raise ValueError("covariates are missing; the Cox model needs a covariate matrix")
    st = _Newton.start(sd.covariates.shape[1])
    for _ in range(max_iter * 40):
        ll, g, info = cox_terms(sd, np.asarray(st["beta"]), ties)
        st, done = _Newton.step(st, ll, g, info, max_iter=max_iter, tol=tol)
        if done:
            f = st["final"]
            return CoxFit(np.asarray(f["coef"]), np.asarray(f["se"]), f["loglik"], st["status"] == "converged",
                          f["iterations"], f["gradient_norm"], sd.n, int(sd.event.sum()))
    raise RuntimeError("Cox Newton-Raphson did not terminate")


class CoxPHProtocol(SiteComputedProtocol):
    """Site-stratified Cox PH by federated Newton-Raphson.

    Each round every site sends its log partial likelihood, score vector and information matrix
    at the current coefficients (summed over its strata; the site is a stratum of its own, and
    ``SurvivalData.stratum`` adds strata inside it). Round 1 also carries the counts used by
    disclosure control. Every site takes the same Newton step (with step halving) from the
    totals, so the coefficients are never chosen by the server.

    Parameters
    ----------
    covariate_names : sequence of str
        One per column of ``SurvivalData.covariates``.
    ties : {"breslow", "efron"}
    max_iter : int
    tol : float
        Convergence: max |Newton step| < tol.
    alpha : float
        1 - confidence level of the HR intervals.
    """

    name: ClassVar[str] = "coxph"

    def __init__(self, covariate_names: Sequence[str], *, ties: str = "breslow", max_iter: int = 50,
                 tol: float = 1e-10, alpha: float = 0.05) -> None:
        if not covariate_names:
            raise ValueError("covariate_names must name at least one covariate")
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.covariate_names = [str(c) for c in covariate_names]
        self.ties, self.max_iter, self.tol, self.alpha = ties, int(max_iter), float(tol), float(alpha)

    def params(self) -> dict[str, Any]:
        return {"covariates": self.covariate_names, "ties": self.ties, "max_iter": self.max_iter,
                "tol": self.tol, "alpha": self.alpha}

    def init_state(self) -> State:
        return {"newton": _Newton.start(len(self.covariate_names)), "counts": None}

    def local(self, data: Any, state: State) -> Contribution:
        sd = as_survival_data(data)
        p = len(self.covariate_names)
        if sd.covariates is None or sd.covariates.shape[1] != p:
            got = None if sd.covariates is None else sd.covariates.shape[1]
            raise ValueError(f"expected {p} covariates ({self.covariate_names}), got {got}")
        ll, g, info = cox_terms(sd, np.asarray(state["newton"]["beta"], dtype=np.float64), self.ties)
        out: Contribution = {"loglik": np.array([ll]), "score": g, "information": info}
        if state["counts"] is None:
            out["n"] = np.array([sd.n, sd.event.sum()], dtype=np.float64)
            out["levels"] = _binary_level_counts(sd.covariates, sd.event)
        return out

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        if state["counts"] is None:
            n = as_count(totals["n"], "n")
            state["counts"] = {"n": int(n[0]), "events": int(n[1]),
                               "levels": as_count(totals["levels"], "levels").tolist()}
        nt, done = _Newton.step(state["newton"], float(totals["loglik"][0]), totals["score"],
                                totals["information"], max_iter=self.max_iter, tol=self.tol)
        state["newton"] = nt
        return state, done

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        cnt = state["counts"]
        nt = state["newton"]
        out: dict[str, Any] = {"method": "coxph", "ties": self.ties, "strata": "site",
                               "covariates": self.covariate_names, "withheld": []}
        n, e = cnt["n"], cnt["events"]
        reasons = []
        if small_count([n, e, n - e], min_count):
            reasons.append(f"patients, events or censored patients are 1..{min_count - 1}")
        lv = np.asarray(cnt["levels"], dtype=np.float64)  # (4, p): n0, n1, e0, e1
        for j, name in enumerate(self.covariate_names):
            if lv[0, j] + lv[1, j] == n:  # binary covariate
                cells = [lv[0, j], lv[1, j], lv[2, j], lv[3, j], lv[0, j] - lv[2, j], lv[1, j] - lv[3, j]]
                if small_count(cells, min_count):
                    reasons.append(f"binary covariate {name!r}: a level has 1..{min_count - 1} patients, "
                                   "events or censored patients")
        if reasons:
            out["withheld"] += [withheld("coxph", r) for r in reasons]
            return out
        f = nt["final"]
        out.update({"n": n, "events": e, "converged": nt["status"] == "converged", "status": nt["status"],
                    "iterations": f["iterations"], "gradient_norm": f["gradient_norm"], "loglik": f["loglik"]})
        out.update(_cox_table(np.asarray(f["coef"]), np.asarray(f["se"]), self.alpha))
        return out


# --------------------------------------------------------------------------------------------
# Time-dependent AUC (cumulative/dynamic, Uno IPCW) and its DeLong-type comparison
# --------------------------------------------------------------------------------------------

def check_score_edges(score_edges: Sequence[float]) -> np.ndarray:
    """Validate a shared score grid: finite, strictly increasing, >= 2 edges."""
    e = np.asarray(score_edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError("score_edges must be a finite, strictly increasing grid with at least 2 edges")
    return e


def bin_scores(scores: np.ndarray, score_edges: np.ndarray) -> np.ndarray:
    """Score-bin index ``[e_b, e_{b+1})`` (last bin closed); values outside go to the end bins."""
    b = np.searchsorted(score_edges, scores, side="right") - 1
    return np.clip(b, 0, score_edges.size - 2)


def _horizon_bin(horizon: float, time_edges: np.ndarray) -> int:
    hits = np.flatnonzero(np.isclose(time_edges[1:], horizon, rtol=0, atol=1e-12))
    if hits.size != 1:
        raise ValueError(f"horizon {horizon!r} must be one of the time_edges after 0 ({time_edges[1:].tolist()})")
    return int(hits[0])


def censoring_survival(censored: np.ndarray, events: np.ndarray) -> np.ndarray:
    """``G_j``: Kaplan-Meier of the censoring distribution at the end of each bin.

    Censorings in a bin happen after that bin's events (the usual tie convention), so the IPCW
    weight of an event in bin ``j`` is ``1 / G_{j-1}`` (``G_{-1} = 1``).
    """
    c = np.asarray(censored, dtype=np.float64)
    d = np.asarray(events, dtype=np.float64)
    n = (c.sum() + d.sum()) - np.concatenate([[0.0], np.cumsum(c + d)[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(n > 0, c / np.where(n > 0, n, 1.0), 0.0)
    return np.cumprod(1.0 - frac)


def _ipcw_weights(idx: np.ndarray, g_end: np.ndarray) -> np.ndarray:
    g_before = np.concatenate([[1.0], g_end])[idx]
    with np.errstate(divide="ignore"):
        return np.where(g_before > 0, 1.0 / np.where(g_before > 0, g_before, 1.0), 0.0)


def _td_cov(m10: np.ndarray, m01: np.ndarray, w_total: float, m: int, n: int) -> np.ndarray:
    """DeLong-type covariance: ``m/(m-1) * M10 / W^2 + M01 / (n (n-1))`` (n-1 denominators, as DeLong)."""
    if m < 2 or n < 2:
        return np.full(m10.shape, np.nan)
    return (m / (m - 1)) * m10 / w_total**2 + m01 / (n * (n - 1))


def _td_summary(auc: np.ndarray, cov: np.ndarray, names: Sequence[str], alpha: float) -> dict[str, Any]:
    z = stats.norm.ppf(1 - alpha / 2)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    out: dict[str, Any] = {"scores": list(names), "auc": auc.tolist(), "se": se.tolist(),
                           "ci_lower": np.clip(auc - z * se, 0, 1).tolist(),
                           "ci_upper": np.clip(auc + z * se, 0, 1).tolist(), "comparisons": []}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            var = cov[a, a] + cov[b, b] - 2 * cov[a, b]
            diff = float(auc[b] - auc[a])
            sd = float(np.sqrt(var)) if var > 0 else float("nan")
            zz = diff / sd if sd > 0 else float("nan")
            out["comparisons"].append({"a": names[a], "b": names[b], "diff_b_minus_a": diff, "se": sd, "z": zz,
                                       "p": float(2 * stats.norm.sf(abs(zz))) if np.isfinite(zz) else float("nan")})
    return out


def time_dependent_auc(time: np.ndarray, event: np.ndarray, scores: np.ndarray, horizon: float,
                       time_edges: Sequence[float], score_edges: Sequence[float], *,
                       score_names: Sequence[str] | None = None, alpha: float = 0.05) -> dict[str, Any]:
    """Pooled cumulative/dynamic time-dependent AUC at ``horizon`` with Uno's IPCW weights.

    Cases: event with binned time <= horizon, weight ``1/G(T-)``; controls: binned time >
    horizon (weight ``1/G(horizon)``, constant, cancels); patients censored by the horizon drop
    out (they enter only through ``G``). Scores are snapped to ``score_edges`` bins; pairs in
    one bin count 1/2. Variance: DeLong-type, from case placement values (weighted) and control
    placement values, treating ``G`` as known; covariance across scores gives the paired test.

    Parameters
    ----------
    time, event : ndarray of shape (n_samples,)
    scores : ndarray of shape (n_samples,) or (n_samples, n_scores)
        Higher = higher risk of the event by ``horizon``.
    horizon : float
        Must be one of ``time_edges[1:]``.
    time_edges, score_edges : sequence of float
        Fixed grids.
    score_names : sequence of str, optional
    alpha : float

    Returns
    -------
    dict
        ``auc``, ``se``, ``ci_lower``, ``ci_upper`` per score, ``comparisons`` (b - a, se, z, p),
        ``cov``, ``n_cases``, ``n_controls``, ``weights_sum`` and ``grid_bound`` (max |AUC on
        the grid - AUC on the raw scores|, per score).
    """
    sd = SurvivalData(time, event, scores=scores)
    te = check_time_edges(time_edges)
    se_ = check_score_edges(score_edges)
    jt = _horizon_bin(horizon, te)
    names = list(score_names) if score_names is not None else [f"score{i}" for i in range(sd.scores.shape[1])]
    idx, ev = bin_times(sd.time, sd.event, te)
    # Censoring KM, computed directly (per bin loop), independent of the protocol's counting code.
    g_end = np.ones(te.size - 1)
    surv = 1.0
    for j in range(te.size - 1):
        at_risk = int((idx >= j).sum())
        cens = int(((idx == j) & (ev == 0)).sum())
        if at_risk > 0:
            surv *= 1.0 - cens / at_risk
        g_end[j] = surv
    case = (ev == 1) & (idx <= jt)
    ctrl = idx > jt
    w = _ipcw_weights(idx[case], g_end)
    m, n = int(case.sum()), int(ctrl.sum())
    out: dict[str, Any] = {"n_cases": m, "n_controls": n, "weights_sum": float(w.sum()), "horizon": float(horizon)}
    if m == 0 or n == 0:
        raise ValueError(f"no cases or no controls at horizon {horizon}: AUC undefined")
    k = sd.scores.shape[1]
    auc = np.zeros(k)
    bound = np.zeros(k)
    v10 = np.zeros((m, k))
    v01 = np.zeros((n, k))
    for s in range(k):
        bc = bin_scores(sd.scores[case, s], se_)
        bn = bin_scores(sd.scores[ctrl, s], se_)
        psi = (bc[:, None] > bn[None, :]).astype(float) + 0.5 * (bc[:, None] == bn[None, :])
        v10[:, s] = psi.mean(axis=1)
        v01[:, s] = (w[:, None] * psi).sum(axis=0) / w.sum()
        auc[s] = float((w * v10[:, s]).sum() / w.sum())
        same = (bc[:, None] == bn[None, :]).astype(float)
        bound[s] = 0.5 * float((w[:, None] * same).sum()) / (w.sum() * n)
    dv10 = (v10 - auc) * w[:, None]
    dv01 = v01 - auc
    cov = _td_cov(dv10.T @ dv10, dv01.T @ dv01, float(w.sum()), m, n)
    out.update(_td_summary(auc, cov, names, alpha))
    out["cov"] = cov
    out["grid_bound"] = bound.tolist()
    return out


class TimeDependentAUCProtocol(SiteComputedProtocol):
    """Federated cumulative/dynamic time-dependent AUC (Uno IPCW) with a DeLong-type comparison.

    Rounds (all sums):

    1. per time bin, event and censoring counts -> every site derives the censoring KM ``G``;
    2. per score and score bin: IPCW-weighted case mass, case counts and control counts -> AUCs;
    3. each site computes its patients' placement values against the pooled opposite-class
       histograms and sends ``sum w_i^2 (V10_i - A)(V10_i - A)'`` over its cases and
       ``sum (V01_j - A)(V01_j - A)'`` over its controls -> covariance, SEs, paired tests.

    Equal to :func:`time_dependent_auc` on the pooled data (same grids) up to float rounding.

    Parameters
    ----------
    horizon : float
        t of "t-year RFS"; must be one of ``time_edges[1:]``.
    time_edges, score_edges : sequence of float
        Fixed grids from config.
    score_names : sequence of str
        One per column of ``SurvivalData.scores`` (e.g. ``["clinical", "clinical+score"]``).
    alpha : float
    """

    name: ClassVar[str] = "time_dependent_auc"

    def __init__(self, horizon: float, time_edges: Sequence[float], score_edges: Sequence[float],
                 score_names: Sequence[str], alpha: float = 0.05) -> None:
        self.time_edges = check_time_edges(time_edges)
        self.score_edges = check_score_edges(score_edges)
        self.horizon = float(horizon)
        self.jt = _horizon_bin(self.horizon, self.time_edges)
        if not score_names:
            raise ValueError("score_names must name at least one score")
        self.score_names = [str(s) for s in score_names]
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)

    def params(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "time_edges": self.time_edges.tolist(),
                "score_edges": self.score_edges.tolist(), "score_names": self.score_names, "alpha": self.alpha}

    def init_state(self) -> State:
        return {"phase": "censoring"}

    def _site(self, data: Any) -> tuple[SurvivalData, np.ndarray, np.ndarray]:
        sd = as_survival_data(data)
        k = len(self.score_names)
        if sd.scores is None or sd.scores.shape[1] != k:
            got = None if sd.scores is None else sd.scores.shape[1]
            raise ValueError(f"expected {k} score columns ({self.score_names}), got {got}")
        idx, ev = bin_times(sd.time, sd.event, self.time_edges)
        return sd, idx, ev

    def local(self, data: Any, state: State) -> Contribution:
        sd, idx, ev = self._site(data)
        nb = self.time_edges.size - 1
        if state["phase"] == "censoring":
            d, c = _exit_counts(idx, ev, nb)
            return {"events": d, "censored": c}
        case = (ev == 1) & (idx <= self.jt)
        ctrl = idx > self.jt
        w = _ipcw_weights(idx[case], np.asarray(state["g_end"]))
        k, nsb = len(self.score_names), self.score_edges.size - 1
        if state["phase"] == "histograms":
            wc, nc, nn = np.zeros((k, nsb)), np.zeros((k, nsb)), np.zeros((k, nsb))
            for s in range(k):
                np.add.at(wc[s], bin_scores(sd.scores[case, s], self.score_edges), w)
                np.add.at(nc[s], bin_scores(sd.scores[case, s], self.score_edges), 1.0)
                np.add.at(nn[s], bin_scores(sd.scores[ctrl, s], self.score_edges), 1.0)
            return {"case_weight": wc, "case_count": nc, "control_count": nn}
        # placements
        auc = np.asarray(state["auc"])
        below_ctrl = np.asarray(state["ctrl_below_half"])  # (k, nsb): controls below + half in bin, / n
        above_case = np.asarray(state["case_above_half"])  # (k, nsb): case weight above + half in bin, / W
        v10 = np.stack([below_ctrl[s][bin_scores(sd.scores[case, s], self.score_edges)] for s in range(k)], axis=1)
        v01 = np.stack([above_case[s][bin_scores(sd.scores[ctrl, s], self.score_edges)] for s in range(k)], axis=1)
        d10 = (v10 - auc) * w[:, None]
        d01 = v01 - auc
        return {"m10": d10.T @ d10, "m01": d01.T @ d01}

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        if state["phase"] == "censoring":
            d = as_count(totals["events"], "events")
            c = as_count(totals["censored"], "censored")
            g = censoring_survival(c, d)
            return {"phase": "histograms", "g_end": g.tolist(), "n_total": int(d.sum() + c.sum())}, False
        if state["phase"] == "histograms":
            wc = np.asarray(totals["case_weight"])
            nc = as_count(totals["case_count"], "case_count")
            nn = as_count(totals["control_count"], "control_count").astype(np.float64)
            m, n = int(nc[0].sum()), int(nn[0].sum())
            w_total = float(wc[0].sum())
            check_consistent(bool(np.all(nc.sum(axis=1) == m) and np.all(nn.sum(axis=1) == n)),
                             "case/control counts differ between scores")
            check_consistent(m + n <= state["n_total"], "more cases and controls than patients")
            check_consistent(bool(np.all(wc >= nc - 1e-9) and np.allclose(wc.sum(axis=1), w_total)),
                             "IPCW case weights below 1 or differing between scores")
            state.update(phase="placements", n_cases=m, n_controls=n, weights_sum=w_total)
            if m == 0 or n == 0 or w_total <= 0:
                state.update(phase="done", auc=None)
                return state, True
            below = np.cumsum(nn, axis=1) - nn  # controls strictly below each bin
            above = wc.sum(axis=1, keepdims=True) - np.cumsum(wc, axis=1)  # case weight strictly above
            ctrl_below_half = (below + 0.5 * nn) / n
            case_above_half = (above + 0.5 * wc) / w_total
            auc = (wc * ctrl_below_half).sum(axis=1) / w_total
            bound = 0.5 * (wc * nn).sum(axis=1) / (w_total * n)
            state.update(auc=auc.tolist(), grid_bound=bound.tolist(), ctrl_below_half=ctrl_below_half.tolist(),
                         case_above_half=case_above_half.tolist())
            return state, False
        for key in ("m10", "m01"):
            mm = np.asarray(totals[key])
            check_consistent(bool(np.allclose(mm, mm.T) and np.linalg.eigvalsh((mm + mm.T) / 2).min()
                                  >= -1e-9 * (1 + np.abs(mm).max())), f"{key} not positive semi-definite")
        cov = _td_cov(np.asarray(totals["m10"]), np.asarray(totals["m01"]), state["weights_sum"],
                      state["n_cases"], state["n_controls"])
        state.update(phase="done", cov=cov.tolist())
        for key in ("ctrl_below_half", "case_above_half"):
            state.pop(key, None)
        return state, True

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "time_dependent_auc", "definition": "cumulative/dynamic, Uno IPCW",
                               "horizon": self.horizon, "scores": self.score_names, "withheld": []}
        m, n = state.get("n_cases", 0), state.get("n_controls", 0)
        if m == 0 or n == 0 or state.get("auc") is None:
            out["withheld"].append(withheld("time_dependent_auc", "no cases or no controls at the horizon"))
            return out
        if small_count([m, n], min_count):
            out["withheld"].append(withheld("time_dependent_auc",
                                            f"cases or controls at the horizon are 1..{min_count - 1}"))
            return out
        out.update({"n_cases": m, "n_controls": n})
        out.update(_td_summary(np.asarray(state["auc"]), np.asarray(state["cov"]), self.score_names, self.alpha))
        out["grid_bound"] = state["grid_bound"]
        return out
