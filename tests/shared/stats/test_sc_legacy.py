"""The site-computed protocol machinery, and the malicious-server tests for every protocol.

A server in this design relays masked contributions; what it can do is send messages. These tests
play that server: it tries to slip parameters into a round, to forge totals, and to read patients
out of the release.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import pytest

from shared.stats.correlation import SpearmanProtocol
from shared.stats.icc import ICCProtocol
from shared.stats.kmeans import ContingencyProtocol, KMeansProtocol
from shared.stats.sc_legacy import (
    SiteComputedProtocol,
    SiteParticipant,
    run_site_computed,
)
from shared.stats.survival import (
    CoxPHProtocol,
    KaplanMeierProtocol,
    SurvivalData,
    TimeDependentAUCProtocol,
)

EDGES = np.arange(0.0, 6.01, 0.5)


# ---------------------------------------------------------------------------- toy protocols

class SumProtocol(SiteComputedProtocol):
    """Two rounds: sum of x, then sum of squared deviations from the pooled mean."""

    name: ClassVar[str] = "toy_sum"

    def params(self) -> dict[str, Any]:
        return {}

    def init_state(self) -> dict[str, Any]:
        return {"round": 0}

    def local(self, data, state):
        x = np.asarray(data, dtype=float)
        if state["round"] == 0:
            return {"n": np.array([x.size]), "s": np.array([x.sum()])}
        return {"ss": np.array([((x - state["mean"]) ** 2).sum()])}

    def advance(self, state, totals):
        if state["round"] == 0:
            return {"round": 1, "mean": float(totals["s"][0] / totals["n"][0]), "n": int(totals["n"][0])}, False
        return {**state, "round": 2, "var": float(totals["ss"][0] / state["n"])}, True

    def release(self, state, totals, min_count):
        return {"mean": state["mean"], "var": state["var"], "withheld": []}


class RandomAdvance(SumProtocol):
    name: ClassVar[str] = "toy_random"

    def advance(self, state, totals):
        st, done = super().advance(state, totals)
        st["jitter"] = random.random()  # not a function of the totals: sites would disagree
        return st, done


class NumpyState(SumProtocol):
    name: ClassVar[str] = "toy_numpy_state"

    def init_state(self):
        return {"round": 0, "bad": np.zeros(2)}


def test_runner_sums_contributions_and_counts_bytes():
    sites = {"a": [1.0, 2.0, 3.0], "b": [10.0], "c": [4.0, 5.0]}
    res = run_site_computed(SumProtocol(), sites, 1)
    allx = np.array([1, 2, 3, 10, 4, 5], dtype=float)
    assert res.n_rounds == 2
    assert res.released["mean"] == pytest.approx(allx.mean())
    assert res.released["var"] == pytest.approx(allx.var())
    assert res.bytes_sent == {"a": 24, "b": 24, "c": 24}


def test_runner_catches_nondeterministic_advance():
    with pytest.raises(RuntimeError, match="not deterministic"):
        run_site_computed(RandomAdvance(), {"a": [1.0], "b": [2.0]}, 1)


def test_state_must_be_json():
    with pytest.raises(TypeError, match="not JSON-able"):
        run_site_computed(NumpyState(), {"a": [1.0]}, 1)


def test_site_errors_name_the_site():
    good = {"time": [1.0, 2.0], "event": [0, 1], "group": ["x", "x"]}
    with pytest.raises(ValueError, match="site 'b'.*event must contain only 0"):
        run_site_computed(KaplanMeierProtocol(EDGES), {"a": good, "b": {"time": [1.0], "event": [2]}}, 1)
    bad = {"time": [1.0, 2.0], "event": [0, 1], "group": ["x", "y"]}
    with pytest.raises(ValueError, match=r"site 'b'.*\['y'\] are not among the configured groups"):
        run_site_computed(KaplanMeierProtocol(EDGES, groups=["x"]), {"a": good, "b": bad}, 1)


def test_strictest_site_threshold_applies():
    rng = np.random.default_rng(0)
    t = rng.uniform(0.1, 5, 24)
    e = rng.integers(0, 2, 24)
    g = np.array([0] * 17 + [1] * 7)
    sites = {"a": SurvivalData(t[:12], e[:12], group=g[:12]), "b": SurvivalData(t[12:], e[12:], group=g[12:])}
    lax = run_site_computed(KaplanMeierProtocol(EDGES, groups=[0, 1]), sites, {"a": 3, "b": 3})
    strict = run_site_computed(KaplanMeierProtocol(EDGES, groups=[0, 1]), sites, {"a": 3, "b": 8})
    assert lax.released["curves"]["1"] is not None
    assert strict.released["curves"]["1"] is None and strict.min_count == 8


def test_fingerprint_mismatch_is_refused():
    mine = KaplanMeierProtocol(EDGES)
    proposed = KaplanMeierProtocol(np.arange(0.0, 6.01, 0.01))  # a server's finer grid
    SiteParticipant(mine, SurvivalData([1.0], [1]), 5, site="a", expected_fingerprint=mine.fingerprint())
    with pytest.raises(ValueError, match="differ from the site's config"):
        SiteParticipant(proposed, SurvivalData([1.0], [1]), 5, site="a", expected_fingerprint=mine.fingerprint())


def test_release_before_the_end_is_refused():
    p = SiteParticipant(SumProtocol(), [1.0, 2.0], 1, site="a")
    p.receive_totals(p.contribution())
    with pytest.raises(RuntimeError, match="before the protocol finished"):
        p.release()


# ---------------------------------------------------------------------------- every protocol

def _surv(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(size=n), rng.integers(0, 2, n)]).astype(float)
    te = rng.exponential(2.0 / np.exp(0.5 * x[:, 0] - 0.5 * x[:, 1]))
    tc = rng.uniform(0.5, 8.0, n)
    return {"time": np.minimum(te, tc), "event": (te <= tc).astype(int), "x": x,
            "group": rng.integers(0, 2, n), "scores": np.column_stack([x[:, 0], x[:, 0] + rng.normal(size=n)])}


def _survival_sites(fields: dict[str, str], n: int = 120) -> dict[str, SurvivalData]:
    c = _surv(1, n)
    cuts = [0, 30, 75, n]
    return {f"s{i}": SurvivalData(c["time"][a:b], c["event"][a:b], **{k: c[v][a:b] for k, v in fields.items()})
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))}


def _features(n: int = 120, p: int = 4, seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) + rng.integers(0, 2, (n, 1)) * 3
    return {"s0": x[:40], "s1": x[40:100], "s2": x[100:]}


def _ratings() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    subj = rng.normal(0, 3, (90, 1, 3))
    x = subj + rng.normal(size=(90, 2, 3))
    return {"s0": x[:30], "s1": x[30:70], "s2": x[70:]}


def _table() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    r, c = rng.integers(0, 3, 90), rng.integers(0, 2, 90)
    return {"s0": {"rows": r[:30], "cols": c[:30]}, "s1": {"rows": r[30:], "cols": c[30:]}}


CASES: dict[str, Callable[[], tuple[SiteComputedProtocol, Mapping[str, Any]]]] = {
    "kaplan_meier": lambda: (KaplanMeierProtocol(EDGES, groups=[0, 1]), _survival_sites({"group": "group"})),
    "coxph": lambda: (CoxPHProtocol(["x0", "x1"]), _survival_sites({"covariates": "x"})),
    "td_auc": lambda: (TimeDependentAUCProtocol(2.0, EDGES, np.linspace(-4, 4, 81), ["a", "b"]),
                       _survival_sites({"scores": "scores"})),
    "icc": lambda: (ICCProtocol(["f0", "f1", "f2"]), _ratings()),
    "spearman": lambda: (SpearmanProtocol(["f0", "f1", "f2", "f3"], n_bins=64), _features()),
    "kmeans": lambda: (KMeansProtocol(["f0", "f1", "f2", "f3"], ks=(2, 3)), _features()),
    "contingency": lambda: (ContingencyProtocol([0, 1, 2], [0, 1]), _table()),
}

#: What an attacking server would most like to set, per protocol.
INJECT = {"kaplan_meier": "time_edges", "coxph": "beta", "td_auc": "g_end", "icc": "mu", "spearman": "edges",
          "kmeans": "centroids", "contingency": "rows"}


def _drive(protocol: SiteComputedProtocol, sites: Mapping[str, Any], k: int = 5):
    """Run like the runner, returning the participants and every round's totals."""
    parts = {s: SiteParticipant(protocol, d, k, site=s) for s, d in sites.items()}
    history = []
    while True:
        contribs = {s: p.contribution() for s, p in parts.items()}
        totals = {key: sum(c[key] for c in contribs.values()) for key in next(iter(contribs.values()))}
        history.append(totals)
        if all([p.receive_totals(totals) for p in parts.values()]):
            return parts, history


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_cannot_slip_parameters_into_a_round(case):
    protocol, sites = CASES[case]()
    p = SiteParticipant(protocol, next(iter(sites.values())), 5, site="s0")
    mine = p.contribution()
    before = json.dumps(p.state, sort_keys=True)
    forged = {**mine, INJECT[case]: np.zeros(3)}
    with pytest.raises(ValueError, match="unexpected keys"):
        p.receive_totals(forged)
    key = next(iter(mine))
    with pytest.raises(ValueError, match="shape"):
        p.receive_totals({**mine, key: np.zeros(np.asarray(mine[key]).size + 1)})
    assert json.dumps(p.state, sort_keys=True) == before  # refused messages change nothing
    # The participant exposes no other way in: its public interface is contribute / receive totals / release.
    public = {m for m in dir(SiteParticipant) if not m.startswith("_") and callable(getattr(SiteParticipant, m))}
    assert public == {"contribution", "receive_totals", "release"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_inputs_are_a_function_of_params_and_totals_only(case):
    protocol, sites = CASES[case]()
    seen: list[str] = []
    real_local = protocol.local

    def spy(data, state):
        seen.append(json.dumps(state, sort_keys=True))
        return real_local(data, state)

    protocol.local = spy  # type: ignore[method-assign]
    parts, history = _drive(protocol, sites)
    # Replay with a fresh protocol built from the same params: init_state + advance over the totals
    # reproduces every state `local` was called with, at every site, in every round.
    fresh, _ = CASES[case]()
    assert fresh.fingerprint() == protocol.fingerprint()
    state = fresh.init_state()
    n_sites = len(sites)
    for r, totals in enumerate(history):
        expected = json.dumps(json.loads(json.dumps(state)), sort_keys=True)
        assert seen[r * n_sites:(r + 1) * n_sites] == [expected] * n_sites
        state, _done = fresh.advance(json.loads(json.dumps(state)), totals)
    # And a second, independent replay of the site's contributions is bit-identical.
    s0 = next(iter(sites))
    replay = SiteParticipant(CASES[case]()[0], sites[s0], 5, site=s0)
    for totals in history:
        c = replay.contribution()
        assert set(c) == set(totals)
        replay.receive_totals(totals)
    assert replay.release() == parts[s0].release()


TAMPER = {
    "coxph": (1, "information", lambda v: v - 1e6 * np.eye(v.shape[0])),
    "td_auc": (1, "case_count", lambda v: v + np.array([[1.0], [0.0]]) * (np.arange(v.shape[1]) == 3)),
    "icc": (1, "ss_total", lambda v: v * 0.0 - 1.0),
    "spearman": (1, "hist", lambda v: v + (np.arange(v.shape[1]) == 5)),
    "kmeans": (1, "count", lambda v: v + np.array([1e6] + [0.0] * (v.size - 1))),
    "kaplan_meier": (0, "events", lambda v: v + 0.5),
    "contingency": (0, "table", lambda v: v - 100.0),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_forged_totals_that_break_an_invariant_are_refused(case):
    protocol, sites = CASES[case]()
    rnd, key, forge = TAMPER[case]
    parts = {s: SiteParticipant(protocol, d, 5, site=s) for s, d in sites.items()}
    for r in range(rnd + 1):
        contribs = {s: p.contribution() for s, p in parts.items()}
        totals = {k: sum(c[k] for c in contribs.values()) for k in next(iter(contribs.values()))}
        if r < rnd:
            for p in parts.values():
                p.receive_totals(totals)
    totals[key] = forge(np.asarray(totals[key], dtype=float))
    with pytest.raises(ValueError, match="inconsistent|not a non-negative integer count|corrupt"):
        next(iter(parts.values())).receive_totals(totals)


COUNT_KEYS = {"n", "events", "censored", "n_at_risk", "counts", "table", "row_totals", "col_totals", "n_cases",
              "n_controls", "per_site", "observed"}


def _released_counts(obj: Any, key: str | None = None) -> list[float]:
    if isinstance(obj, dict):
        return [v for k, val in obj.items() for v in _released_counts(val, k)]
    if isinstance(obj, list):
        return [v for val in obj for v in _released_counts(val, key)]
    if key in COUNT_KEYS and isinstance(obj, int | float) and not isinstance(obj, bool):
        return [float(obj)]
    return []


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [5, 11])
def test_every_released_count_covers_zero_or_at_least_k_patients(case, k):
    protocol, sites = CASES[case]()
    res = run_site_computed(protocol, sites, k)
    counts = np.array(_released_counts(res.released))
    assert not np.any((counts > 0) & (counts < k)), counts
    for w in res.released["withheld"]:
        assert set(w) == {"quantity", "reason"}
    # Nothing of the round totals (fine-grid histograms, per-bin counts, placements) is in the release.
    text = json.dumps(res.released)
    for forbidden in ("hist", "rank_products", "case_weight", "scatter", "m10", "information", "g_end"):
        assert f'"{forbidden}"' not in text
