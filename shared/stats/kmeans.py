"""Federated k-means subtypes with k chosen from sums, and subtype x response association.

k-means (:class:`KMeansProtocol`, pooled reference :func:`kmeans_select`)
-----------------------------------------------------------------------
1. **Moments** (sums, sums of squares) -> pooled mean and SD; features are standardised with
   them on every site (``standardize=True``).
2. **Deterministic start: PCA-Part** (Su & Dy, 2007): begin with one cluster (the pooled mean);
   repeatedly split the cluster with the largest within-cluster sum of squares along its first
   principal axis, at ``mean +- sqrt(2 lambda / pi) v`` (the means of the two halves of a normal
   along ``v``), reassigning every patient to the nearest centroid after each split. Each split
   needs only the per-cluster count, sum and scatter matrix ``sum x x'`` (sums). The starts for
   every k in ``ks`` come from one run up to ``max(ks)``. Why not k-means++: its seeding samples
   individual patients as centres, and a centroid made of one patient's features would reach the
   other sites in the totals; PCA-Part uses whole-cluster sums only, needs no seed, so no party
   (server included) can steer the start by choosing one, and in the literature it performs
   on par with k-means++ for moderate k.
3. **Lloyd iterations** from that start: per cluster count, sum, and sum of squared distances to
   the current centroid; the new centroids are the pooled means (an empty cluster keeps its
   centroid); stop when the centroids no longer change (exact) or after ``max_iter``.
4. **k-selection: Calinski-Harabasz** ``CH = [B / (k - 1)] / [W / (n - k)]`` with the within
   (``W``) and between (``B``) sums of squares of the final assignment, both exact from the
   sums (equal to scikit-learn's ``calinski_harabasz_score`` on the pooled standardised data).
   Chosen ``k`` = argmax CH among the ks whose clusters all hold 0 or >= ``min_count`` patients.

Every step equals the pooled computation (:func:`kmeans_select`) from the same start; the tests
check identical assignments and centroids. Released: CH, W and the cluster sizes per k, and the
chosen k's centroids in original units (each a mean over >= ``min_count`` patients). A site labels
its own patients with :func:`assign` using the final state (never sent anywhere).

Note: sites see the round totals (that is the design), so a cluster that briefly holds one
patient during the iterations shows that patient's standardised features to the other sites
(never to the server). The release never does.

Subtype x response (:class:`ContingencyProtocol`, pooled :func:`contingency_test`)
--------------------------------------------------------------------------------
Counts per (subtype, response) cell are sums: Pearson chi-square (no continuity correction),
df, p, Cramer's V. The table and test are withheld if any pooled cell is 0 < count < k
(with the margins, the statistic of a small table would give the cells back). Optional per-site
prevalence (opt-in: it shows each site's own counts to the server) under the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from .correlation import check_features
from .sc_legacy import (
    Contribution,
    SiteComputedProtocol,
    State,
    as_count,
    check_consistent,
    small_count,
    withheld,
)

# --------------------------------------------------------------------------------------------
# Building blocks shared by the pooled reference and the protocol
# --------------------------------------------------------------------------------------------

def standardizer(n: int, s: np.ndarray, ss: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, scale)`` from sums: population SD (a constant feature gets scale 1); identity if off."""
    mean = s / n
    if not standardize:
        return np.zeros_like(mean), np.ones_like(mean)
    sd = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return mean, np.where(sd > 1e-7 * np.maximum(1.0, np.abs(mean)), sd, 1.0)


def nearest(z: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid (ties -> lowest index) and the squared distance to it."""
    d2 = ((z[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    lab = np.argmin(d2, axis=1)
    return lab, d2[np.arange(z.shape[0]), lab]


def cluster_sums(z: np.ndarray, lab: np.ndarray, k: int, scatter: bool = False) -> dict[str, np.ndarray]:
    """Per-cluster count, sum (and scatter matrix ``sum z z'``) of the rows of ``z``."""
    p = z.shape[1]
    cnt = np.bincount(lab, minlength=k).astype(np.float64)
    sm = np.zeros((k, p))
    np.add.at(sm, lab, z)
    out = {"count": cnt, "sum": sm}
    if scatter:
        sc = np.zeros((k, p, p))
        np.add.at(sc, lab, z[:, :, None] * z[:, None, :])
        out["scatter"] = sc
    return out


def pca_part_split(centroids: np.ndarray, count: np.ndarray, sm: np.ndarray,
                   sc: np.ndarray) -> tuple[np.ndarray | None, str]:
    """One PCA-Part step from per-cluster sums: the new centroid list, or None and why not."""
    k, p = sm.shape
    means = centroids.copy()
    nz = count > 0
    means[nz] = sm[nz] / count[nz, None]
    sse = np.where(nz, np.trace(sc, axis1=1, axis2=2) - np.where(nz, (sm**2).sum(axis=1) / np.where(nz, count, 1), 0),
                   0.0)
    c = int(np.argmax(sse))
    if count[c] < 2 or sse[c] <= 1e-12 * max(1.0, float(np.abs(sc).max())):
        return None, "no cluster with two or more distinct patients left to split (fewer distinct patients than k)"
    cov = sc[c] / count[c] - np.outer(means[c], means[c])
    w, v = np.linalg.eigh((cov + cov.T) / 2.0)
    lam, vec = float(w[-1]), v[:, -1]
    vec = vec * (1.0 if vec[int(np.argmax(np.abs(vec)))] >= 0 else -1.0)
    step = np.sqrt(2.0 * max(lam, 0.0) / np.pi) * vec
    new = np.vstack([means[:c], means[c] - step, means[c + 1:], means[c] + step])
    return new, ""


def lloyd_update(centroids: np.ndarray, count: np.ndarray, sm: np.ndarray) -> np.ndarray:
    """New centroids: cluster means; an empty cluster keeps its centroid."""
    new = centroids.copy()
    nz = count > 0
    new[nz] = sm[nz] / count[nz, None]
    return new


def ch_from_sums(n: int, grand_mean: np.ndarray, centroids: np.ndarray, count: np.ndarray, sm: np.ndarray,
                 sse_to_centroid: np.ndarray) -> dict[str, float]:
    """Within/between SS and Calinski-Harabasz of an assignment, from its per-cluster sums.

    ``sse_to_centroid[c]`` is ``sum ||z - centroids[c]||^2`` over the cluster's members; the
    within SS about the members' mean is that minus ``count * ||mean - centroid||^2`` (exact).
    """
    nz = count > 0
    means = centroids.copy()
    means[nz] = sm[nz] / count[nz, None]
    w = float((sse_to_centroid - count * ((means - centroids) ** 2).sum(axis=1)).sum())
    b = float((count * ((means - grand_mean) ** 2).sum(axis=1)).sum())
    kk = int(nz.sum())
    ch = (b / (kk - 1)) / (w / (n - kk)) if kk > 1 and n > kk and w > 0 else float("nan")
    return {"within_ss": max(w, 0.0), "between_ss": b, "calinski_harabasz": ch, "n_nonempty": kk}


# --------------------------------------------------------------------------------------------
# Pooled reference
# --------------------------------------------------------------------------------------------

def pca_part_init(z: np.ndarray, k_max: int, start: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Pooled PCA-Part starts ``{k: centroids}`` for k = 1..k_max (stops early if it cannot split).

    ``start`` is the one-cluster centroid (default: the mean of ``z``).
    """
    cents = (z.mean(axis=0) if start is None else np.asarray(start, dtype=np.float64))[None, :].copy()
    out = {1: cents.copy()}
    while cents.shape[0] < k_max:
        lab, _ = nearest(z, cents)
        s = cluster_sums(z, lab, cents.shape[0], scatter=True)
        new, _why = pca_part_split(cents, s["count"], s["sum"], s["scatter"])
        if new is None:
            break
        cents = new
        out[cents.shape[0]] = cents.copy()
    return out


def lloyd(z: np.ndarray, init: np.ndarray, max_iter: int = 100, grand_mean: np.ndarray | None = None) -> dict[str, Any]:
    """Pooled Lloyd iterations from ``init``; same update and stopping rule as the protocol.

    ``grand_mean`` (default: the mean of ``z``) enters the between-cluster sum of squares.
    """
    gm = z.mean(axis=0) if grand_mean is None else np.asarray(grand_mean, dtype=np.float64)
    cents = np.asarray(init, dtype=np.float64).copy()
    n = z.shape[0]
    for it in range(1, max_iter + 1):
        lab, d2 = nearest(z, cents)
        s = cluster_sums(z, lab, cents.shape[0])
        sse = np.bincount(lab, weights=d2, minlength=cents.shape[0])
        new = lloyd_update(cents, s["count"], s["sum"])
        if np.array_equal(new, cents) or it == max_iter:
            crit = ch_from_sums(n, gm, cents, s["count"], s["sum"], sse)
            return {"centroids": new, "labels": lab, "counts": s["count"].astype(int), "iterations": it,
                    "converged": bool(np.array_equal(new, cents)), **crit}
        cents = new
    raise AssertionError("unreachable")


def kmeans_select(x: Any, ks: Sequence[int] = (2, 3, 4, 5), *, standardize: bool = True,
                  max_iter: int = 100) -> dict[str, Any]:
    """Pooled reference of :class:`KMeansProtocol` (before disclosure control).

    Returns
    -------
    dict
        ``mean``, ``scale``, ``inits`` ({k: start}), ``fits`` ({k: :func:`lloyd` output}) and
        ``best_k`` (argmax Calinski-Harabasz; ties -> smallest k).
    """
    a = check_features(x)
    ks = _check_ks(ks)
    mean, scale = standardizer(a.shape[0], a.sum(axis=0), (a**2).sum(axis=0), standardize)
    z = (a - mean) / scale
    grand = (a.sum(axis=0) / a.shape[0] - mean) / scale
    inits = pca_part_init(z, max(ks), grand)
    fits = {k: lloyd(z, inits[k], max_iter, grand) for k in ks if k in inits}
    ch = {k: f["calinski_harabasz"] for k, f in fits.items() if np.isfinite(f["calinski_harabasz"])}
    best = min(ch, key=lambda k: (-ch[k], k)) if ch else None
    return {"mean": mean, "scale": scale, "inits": inits, "fits": fits, "best_k": best}


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 2:
        raise ValueError(f"ks must be integers >= 2, got {list(ks)!r}")
    return out


# --------------------------------------------------------------------------------------------
# Federated protocol
# --------------------------------------------------------------------------------------------

class KMeansProtocol(SiteComputedProtocol):
    """Federated k-means for each k in ``ks`` from PCA-Part starts; k chosen by Calinski-Harabasz.

    Parameters
    ----------
    feature_names : sequence of str
        One per column of a site's feature matrix (radiomic features or deep signatures).
    ks : sequence of int
        Candidate numbers of clusters (>= 2).
    standardize : bool
        Standardise with the pooled mean/SD first (recommended for radiomic features).
    max_iter : int
        Lloyd iterations per k at most.
    """

    name: ClassVar[str] = "kmeans"

    def __init__(self, feature_names: Sequence[str], ks: Sequence[int] = (2, 3, 4, 5), *,
                 standardize: bool = True, max_iter: int = 100) -> None:
        if not feature_names:
            raise ValueError("feature_names must name at least one feature")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
        self.feature_names = [str(f) for f in feature_names]
        self.ks = _check_ks(ks)
        self.standardize, self.max_iter = bool(standardize), int(max_iter)

    def params(self) -> dict[str, Any]:
        return {"features": self.feature_names, "ks": self.ks, "standardize": self.standardize,
                "max_iter": self.max_iter}

    def init_state(self) -> State:
        return {"phase": "moments"}

    def _z(self, data: Any, state: State) -> np.ndarray:
        a = check_features(data, len(self.feature_names))
        return (a - np.asarray(state["mean"])) / np.asarray(state["scale"])

    def local(self, data: Any, state: State) -> Contribution:
        if state["phase"] == "moments":
            a = check_features(data, len(self.feature_names))
            return {"n": np.array([a.shape[0]], dtype=np.float64), "sum": a.sum(axis=0), "sumsq": (a**2).sum(axis=0)}
        z = self._z(data, state)
        cents = np.asarray(state["centroids"], dtype=np.float64)
        lab, d2 = nearest(z, cents)
        if state["phase"] == "init":
            return cluster_sums(z, lab, cents.shape[0], scatter=True)
        s = cluster_sums(z, lab, cents.shape[0])
        s["sse"] = np.bincount(lab, weights=d2, minlength=cents.shape[0]).astype(np.float64)
        return s

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        ph = state["phase"]
        if ph == "moments":
            n = int(as_count(totals["n"], "n")[0])
            if n == 0:
                return {"phase": "done", "n": 0, "fits": {}, "status": "no patients"}, True
            mean, scale = standardizer(n, np.asarray(totals["sum"]), np.asarray(totals["sumsq"]), self.standardize)
            grand = ((np.asarray(totals["sum"]) / n) - mean) / scale
            st = {"phase": "init", "n": n, "mean": mean.tolist(), "scale": scale.tolist(), "grand": grand.tolist(),
                  "centroids": [grand.tolist()], "inits": {"1": [grand.tolist()]}, "fits": {}, "status": "running"}
            return self._next_after_init(st), False
        count = as_count(totals["count"], "count").astype(np.float64)
        check_consistent(int(count.sum()) == state["n"], "cluster counts do not add up to the patients of round 1")
        cents = np.asarray(state["centroids"], dtype=np.float64)
        if ph == "init":
            sm, sc = np.asarray(totals["sum"]), np.asarray(totals["scatter"])
            tr = np.trace(sc, axis1=1, axis2=2)
            check_consistent(bool(np.all(tr * count + 1e-9 * (1 + tr * count) >= (sm**2).sum(axis=1))),
                             "cluster sums exceed what their scatter allows (Cauchy-Schwarz)")
            new, why = pca_part_split(cents, count, np.asarray(totals["sum"]), np.asarray(totals["scatter"]))
            if new is None:
                state["status"] = why
                state["init_stopped_at"] = int(cents.shape[0])
                return self._start_lloyd(state)
            state["centroids"] = new.tolist()
            state["inits"][str(new.shape[0])] = new.tolist()
            return self._next_after_init(state), False
        # lloyd
        check_consistent(bool(np.all(np.asarray(totals["sse"]) >= 0)), "negative within-cluster sums of squares")
        state["iteration"] += 1
        new = lloyd_update(cents, count, np.asarray(totals["sum"]))
        converged = bool(np.array_equal(new, cents))
        if converged or state["iteration"] >= self.max_iter:
            k = int(cents.shape[0])
            crit = ch_from_sums(state["n"], np.asarray(state["grand"]), cents, count, np.asarray(totals["sum"]),
                                np.asarray(totals["sse"]))
            state["fits"][str(k)] = {"centroids": new.tolist(), "counts": count.astype(int).tolist(),
                                     "iterations": state["iteration"], "converged": converged, **crit}
            return self._start_lloyd(state, after=k)
        state["centroids"] = new.tolist()
        return state, False

    def _next_after_init(self, state: State) -> State:
        if len(state["centroids"]) >= max(self.ks):
            return self._start_lloyd(state)[0]
        return state

    def _start_lloyd(self, state: State, after: int | None = None) -> tuple[State, bool]:
        todo = [k for k in self.ks if str(k) in state["inits"] and (after is None or k > after)]
        if not todo:
            state["phase"] = "done"
            state.pop("centroids", None)
            return state, True
        state.update(phase="lloyd", centroids=state["inits"][str(todo[0])], iteration=0)
        return state, False

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "kmeans", "init": "pca-part", "criterion": "calinski_harabasz",
                               "features": self.feature_names, "withheld": []}
        n = state.get("n", 0)
        if small_count(n, min_count) or n == 0:
            out["withheld"].append(withheld("kmeans", f"fewer than min_count={min_count} patients"))
            return out
        out["n"] = n
        choice = choose_k(state, min_count)
        per_k: dict[str, Any] = {}
        for k in self.ks:
            f = state["fits"].get(str(k))
            if f is None:
                out["withheld"].append(withheld(f"kmeans.k{k}", state.get("status", "not fitted")))
                continue
            ok = choice["eligible"][str(k)]
            per_k[str(k)] = {"calinski_harabasz": f["calinski_harabasz"], "within_ss": f["within_ss"],
                             "converged": f["converged"], "iterations": f["iterations"], "eligible": ok,
                             "counts": f["counts"] if ok else None}
            if not ok:
                out["withheld"].append(withheld(f"kmeans.k{k}", f"a cluster has 1..{min_count - 1} patients: sizes "
                                                                "and centroids withheld, k not eligible"))
        out["per_k"] = per_k
        out["best_k"] = choice["best_k"]
        if choice["best_k"] is not None:
            f = state["fits"][str(choice["best_k"])]
            cz = np.asarray(f["centroids"])
            out["centroids"] = (cz * np.asarray(state["scale"]) + np.asarray(state["mean"])).tolist()
            out["counts"] = f["counts"]
        return out


def choose_k(state: State, min_count: int) -> dict[str, Any]:
    """The chosen k from a finished :class:`KMeansProtocol` state: argmax CH among eligible ks.

    Every site computes this from its own copy of the state, so all agree without the server.
    """
    eligible = {k: (not small_count(f["counts"], min_count)) and f["calinski_harabasz"] is not None
                and np.isfinite(f["calinski_harabasz"]) for k, f in state.get("fits", {}).items()}
    cands = [int(k) for k, ok in eligible.items() if ok]
    best = min(cands, key=lambda k: (-state["fits"][str(k)]["calinski_harabasz"], k)) if cands else None
    return {"best_k": best, "eligible": eligible}


def assign(data: Any, state: State, k: int) -> np.ndarray:
    """Label a site's own patients with the final centroids for ``k`` (stays on the site).

    Parameters
    ----------
    data : array-like of shape (n_samples, n_features)
    state : dict
        The final :class:`KMeansProtocol` state (``SiteComputedResult.state``).
    k : int

    Returns
    -------
    ndarray of shape (n_samples,), int
    """
    fit = state.get("fits", {}).get(str(int(k)))
    if fit is None:
        raise ValueError(f"no fitted clustering for k={k}; fitted: {sorted(state.get('fits', {}))}")
    a = check_features(data, len(state["mean"]))
    z = (a - np.asarray(state["mean"])) / np.asarray(state["scale"])
    return nearest(z, np.asarray(fit["centroids"]))[0]


# --------------------------------------------------------------------------------------------
# Subtype x response
# --------------------------------------------------------------------------------------------

def contingency_test(rows: Any, cols: Any, row_labels: Sequence[Any], col_labels: Sequence[Any]) -> dict[str, Any]:
    """Pooled table and Pearson chi-square (no continuity correction), df, p, Cramer's V."""
    table = _table(np.asarray(rows), np.asarray(cols), row_labels, col_labels)
    return {"table": table} | _chi2(table)


def _table(rows: np.ndarray, cols: np.ndarray, row_labels: Sequence[Any], col_labels: Sequence[Any]) -> np.ndarray:
    if rows.shape != cols.shape or rows.ndim != 1:
        raise ValueError(f"rows and cols must be 1-d of equal length, got {rows.shape} and {cols.shape}")
    rl = {str(v): i for i, v in enumerate(row_labels)}
    cl = {str(v): i for i, v in enumerate(col_labels)}
    bad_r = sorted({str(v) for v in rows} - set(rl))
    bad_c = sorted({str(v) for v in cols} - set(cl))
    if bad_r or bad_c:
        raise ValueError(f"labels not configured: rows {bad_r} (allowed {list(rl)}), cols {bad_c} (allowed {list(cl)})")
    t = np.zeros((len(rl), len(cl)))
    np.add.at(t, ([rl[str(v)] for v in rows], [cl[str(v)] for v in cols]), 1.0)
    return t


def _chi2(table: np.ndarray) -> dict[str, Any]:
    t = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    n = t.sum()
    if t.shape[0] < 2 or t.shape[1] < 2:
        return {"chi2": float("nan"), "df": 0, "p": float("nan"), "cramers_v": float("nan")}
    exp = np.outer(t.sum(axis=1), t.sum(axis=0)) / n
    chi2 = float(((t - exp) ** 2 / exp).sum())
    df = (t.shape[0] - 1) * (t.shape[1] - 1)
    v = float(np.sqrt(chi2 / (n * (min(t.shape) - 1))))
    return {"chi2": chi2, "df": int(df), "p": float(stats.chi2.sf(chi2, df)), "cramers_v": v}


class ContingencyProtocol(SiteComputedProtocol):
    """Subtype x response counts and chi-square under disclosure control (one round of counts).

    A site's data is a mapping ``{"rows": subtype per patient, "cols": response per patient}``
    (plus ``"site"``, its own name, when ``per_site`` is set).

    Parameters
    ----------
    row_labels, col_labels : sequence
        All possible subtypes and responses (e.g. ``[0, 1, 2]`` and ``[0, 1]``).
    per_site : sequence of str, optional
        Site names: release each site's subtype prevalence too (opt-in: the server then sees
        each site's own counts, each 0 or >= k).
    """

    name: ClassVar[str] = "contingency"

    def __init__(self, row_labels: Sequence[Any], col_labels: Sequence[Any],
                 per_site: Sequence[str] | None = None) -> None:
        if len(row_labels) < 2 or len(col_labels) < 2:
            raise ValueError("row_labels and col_labels need at least 2 labels each")
        self.row_labels = [str(v) for v in row_labels]
        self.col_labels = [str(v) for v in col_labels]
        self.per_site = None if per_site is None else [str(s) for s in per_site]

    def params(self) -> dict[str, Any]:
        return {"rows": self.row_labels, "cols": self.col_labels, "per_site": self.per_site}

    def init_state(self) -> State:
        return {"phase": "counts"}

    def local(self, data: Any, state: State) -> Contribution:
        if not isinstance(data, Mapping) or "rows" not in data or "cols" not in data:
            raise ValueError("contingency data must be a mapping with 'rows' (subtype) and 'cols' (response)")
        t = _table(np.asarray(data["rows"]), np.asarray(data["cols"]), self.row_labels, self.col_labels)
        out: Contribution = {"table": t}
        if self.per_site is not None:
            site = str(data.get("site"))
            if site not in self.per_site:
                raise ValueError(f"site name {site!r} is not among the configured sites {self.per_site}")
            ps = np.zeros((len(self.per_site), len(self.row_labels)))
            ps[self.per_site.index(site)] = t.sum(axis=1)
            out["per_site"] = ps
        return out

    def advance(self, state: State, totals: Mapping[str, np.ndarray]) -> tuple[State, bool]:
        for key in totals:
            as_count(totals[key], key)
        return {"phase": "done"}, True

    def release(self, state: State, totals: Mapping[str, np.ndarray], min_count: int) -> dict[str, Any]:
        t = as_count(totals["table"], "table").astype(np.float64)
        out: dict[str, Any] = {"method": "contingency", "rows": self.row_labels, "cols": self.col_labels,
                               "withheld": []}
        if small_count(t, min_count):
            out["withheld"].append(withheld("contingency.table", f"a cell has 1..{min_count - 1} patients: table "
                                                                 "and chi-square withheld"))
            for name, m in (("row_totals", t.sum(axis=1)), ("col_totals", t.sum(axis=0))):
                if small_count(m, min_count):
                    out["withheld"].append(withheld(f"contingency.{name}", f"a total is 1..{min_count - 1}"))
                else:
                    out[name] = m.astype(int).tolist()
        else:
            out["table"] = t.astype(int).tolist()
            out["row_totals"] = t.sum(axis=1).astype(int).tolist()
            out["col_totals"] = t.sum(axis=0).astype(int).tolist()
            out.update(_chi2(t))
        if self.per_site is not None:
            ps = as_count(totals["per_site"], "per_site").astype(np.float64)
            rows = {}
            for i, s in enumerate(self.per_site):
                if small_count(ps[i], min_count):
                    out["withheld"].append(withheld(f"contingency.per_site.{s}",
                                                    f"a subtype count at this site is 1..{min_count - 1}"))
                    rows[s] = None
                else:
                    rows[s] = ps[i].astype(int).tolist()
            out["per_site"] = rows
        return out
