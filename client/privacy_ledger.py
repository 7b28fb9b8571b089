"""The site's privacy ledger: its differential-privacy spend, kept on site, per run and stage.

On the Deployment Engine every message runs in a fresh ClientApp process, so the accountant cannot
live in memory: the ledger is a JSON file in the site's own cache,
``<cache>/privacy/<run id>.json`` (mode 0600), read before and written after every DP training
round. It holds, per stage (``train`` for the response backbones; a segmentation stage adds its
own), the Opacus accountant's history (``[noise_multiplier, sample_rate, steps]`` entries, as
``IAccountant.state_dict`` has it), the settings fixed at the stage's first round (noise
multiplier, clipping bound, delta) and one record per round. A resumed run has the same run id,
so it continues the same ledger.

Epsilon is computed by Opacus' own accountant (``rdp`` or ``prv``) over that history, at the
site's delta. A patient is in every backbone a site trains (one slice per sequence and timepoint),
so the steps of all backbones are composed: the stage's epsilon covers the whole update a site
sends. The site's total for a run composes all its stages; that total is what its own
``policy.epsilon_budget`` caps (:meth:`PrivacyLedger.check_budget`).

The ledger also holds a secret drawn from ``os.urandom`` when it is created: the seed of the
Poisson sampling and of the noise. It never leaves the site; a server that knew the noise could
subtract it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.train import DPSGD
from shared.config import PrivacyConfig

logger = logging.getLogger(__name__)

LEDGER_DIR = "privacy"
VERSION = 1
History = list[tuple[float, float, int]]
"""Opacus accountant history: ``(noise_multiplier, sample_rate, steps)`` entries."""


def make_accountant(mechanism: str, history: History | None = None) -> Any:
    """An Opacus accountant (``rdp`` or ``prv``) holding ``history``."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    if history:
        acc.load_state_dict({"history": [tuple(h) for h in history], "mechanism": mechanism})
    return acc


def compact(history: History) -> History:
    """Entries with the same noise and sample rate merged (their steps summed), in first-seen order.

    Composition does not depend on the order of the steps, and Opacus' accountants compute an
    entry's loss from ``steps`` times one step's (RDP) or by self-composition (PRV): merging gives
    the same epsilon while the cost of computing it no longer grows with the number of rounds and
    backbones (Opacus' RDP of one entry costs ~0.1-1 s on a CPU).
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(sigma, q, steps) for (sigma, q), steps in merged.items() if steps > 0]


def epsilon_of(mechanism: str, history: History, delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` by Opacus' accountant (0 for an empty history)."""
    history = compact(history)
    if not history:
        return 0.0
    return float(make_accountant(mechanism, history).get_epsilon(delta=delta))


def batches(n: int, batch_size: int) -> tuple[float, int]:
    """Poisson sample rate and steps per epoch for ``n`` cases at ``batch_size``, as Opacus' ``make_private``
    does for a DataLoader: ``steps = ceil(n / batch_size)``, ``sample_rate = 1 / steps``."""
    steps = max(1, math.ceil(n / batch_size))
    return 1.0 / steps, steps


def calibrate_noise(target_epsilon: float, delta: float, plan: list[tuple[float, int]], mechanism: str,
                    tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) whose ``plan`` spends at most ``target_epsilon``.

    ``plan``: ``(sample_rate, steps)`` of every backbone over the planned rounds; the same search as
    Opacus' ``get_noise_multiplier``, over a composed (heterogeneous) history.

    Raises
    ------
    ValueError
        When no noise up to 1e6 reaches the target.
    """
    def eps(sigma: float) -> float:
        return epsilon_of(mechanism, [(sigma, q, s) for q, s in plan if s > 0], delta)

    lo, hi = 0.0, 10.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"privacy.target_epsilon {target_epsilon:g} cannot be reached at delta {delta:.3g}")
        eps_hi = eps(hi)
    while target_epsilon - eps_hi > tolerance:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e < target_epsilon:
            hi, eps_hi = mid, e
        else:
            lo = mid
    return hi


@dataclass
class RoundPlan:
    """One stage's DP-SGD settings for one round at one site (made by :meth:`PrivacyLedger.plan`)."""

    stage: str
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    mechanism: str
    secret: int
    sample_rates: dict[str, float]
    steps: dict[str, int]
    """Steps each backbone takes this round."""
    accountant: Any = None
    """Opacus accountant holding the stage's history so far; training steps it."""

    def history(self) -> History:
        """What this round adds to the accountant (one entry per backbone that trains)."""
        return [(self.noise_multiplier, self.sample_rates[k], s) for k, s in self.steps.items() if s > 0]

    def for_backbone(self, key: str, epochs: int) -> DPSGD:
        """The :class:`client.train.DPSGD` of backbone ``key`` (its steps per epoch: steps / epochs)."""
        return DPSGD(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                     sample_rate=self.sample_rates[key], steps_per_epoch=max(1, self.steps[key] // max(epochs, 1)),
                     accountant=self.accountant, secret=self.secret)


@dataclass
class PrivacyLedger:
    """One site's DP spend in one run (all stages); persisted when ``path`` is set.

    Parameters
    ----------
    site : str
    run_id : str
    path : Path, optional
        The ledger file; None keeps it in memory (the simulation's pooled/local baselines).
    """

    site: str
    run_id: str
    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ files
    @staticmethod
    def file_for(cache_dir: Path, run_id: str) -> Path:
        """``<cache>/privacy/<run id>.json`` (a run id that is not a plain name is hashed)."""
        safe = run_id if re.fullmatch(r"[A-Za-z0-9._-]{1,120}", run_id) and run_id not in (".", "..") else None
        if safe is None:
            import hashlib

            safe = "run-" + hashlib.sha256(run_id.encode()).hexdigest()[:24]
        return Path(cache_dir) / LEDGER_DIR / f"{safe}.json"

    @classmethod
    def open(cls, cache_dir: Path, run_id: str, site: str) -> PrivacyLedger:
        """The site's ledger of ``run_id`` from its cache (a new one if this run never trained here)."""
        if not run_id:
            raise ValueError("differential privacy needs the run id (message config 'run-id') to keep the "
                             "site's privacy ledger")
        path = cls.file_for(cache_dir, run_id)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"site {site}: the privacy ledger {path} is unreadable ({exc}); it is the record "
                                 "of this run's privacy spend: restore it from a backup, or start a new run") from None
            if data.get("run_id") != run_id or data.get("version") != VERSION:
                raise ValueError(f"site {site}: {path} is not the privacy ledger of run {run_id!r}")
            return cls(site, run_id, path, data)
        return cls(site, run_id, path, cls._new(run_id, site))

    @classmethod
    def in_memory(cls, site: str, run_id: str = "in-memory") -> PrivacyLedger:
        """A ledger that is never written (simulation baselines: one process trains and reports)."""
        return cls(site, run_id, None, cls._new(run_id, site))

    @staticmethod
    def _new(run_id: str, site: str) -> dict[str, Any]:
        return {"version": VERSION, "run_id": run_id, "site": site, "secret": secrets.randbits(63),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "stages": {}}

    def save(self) -> None:
        """Write the ledger atomically, readable by the site's user only."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, indent=1)
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ reading
    @property
    def secret(self) -> int:
        return int(self.data["secret"])

    def stage(self, stage: str) -> dict[str, Any] | None:
        """The stage's record (settings, history, rounds), or None before its first round."""
        return self.data["stages"].get(stage)

    def history(self, stage: str | None = None) -> History:
        """The accountant history of one stage, or of every stage (composed) when ``stage`` is None."""
        stages = [self.stage(stage)] if stage is not None else list(self.data["stages"].values())
        return [tuple(h) for st in stages if st for h in st["history"]]  # type: ignore[misc]

    def mechanism(self) -> str | None:
        st = next(iter(self.data["stages"].values()), None)
        return st["accountant"] if st else None

    def delta(self) -> float | None:
        st = next(iter(self.data["stages"].values()), None)
        return float(st["delta"]) if st else None

    def epsilon(self, stage: str | None = None, extra: History | None = None) -> float:
        """Epsilon spent (by Opacus' accountant) in ``stage`` or in all stages, optionally plus ``extra``."""
        mech, delta = self.mechanism(), self.delta()
        if mech is None or delta is None:
            return 0.0
        return epsilon_of(mech, self.history(stage) + list(extra or []), delta)

    # ------------------------------------------------------------------ a round
    def plan(self, stage: str, privacy: PrivacyConfig, sizes: dict[str, int], n_patients: int, *, batch_size: int,
             epochs: int, planned_rounds: int) -> RoundPlan:
        """The DP-SGD settings of this round, fixing the stage's settings at its first round.

        Parameters
        ----------
        sizes : dict
            Training cases per backbone (``{"pre_t2w": 42, ...}``); each backbone's sample rate.
        n_patients : int
            Distinct training patients (``delta = 1 / (10 n)`` with ``privacy.delta: auto``).
        epochs : int
            Local epochs this round.
        planned_rounds : int
            Rounds of the run (``federation.rounds``): ``target_epsilon`` is spread over them.

        Raises
        ------
        ValueError
            A delta not below 1 / n_patients; DP settings that changed since the stage's first round.
        """
        if n_patients <= 0:
            raise ValueError(f"site {self.site}: no training patients, nothing to train with differential privacy")
        rates = {k: batches(n, batch_size) for k, n in sizes.items() if n > 0}
        st = self.stage(stage)
        asked = {"max_grad_norm": privacy.max_grad_norm, "noise_multiplier": privacy.noise_multiplier,
                 "target_epsilon": privacy.target_epsilon, "delta_setting": privacy.delta,
                 "accountant": privacy.accountant}
        if st is None:
            if privacy.delta == "auto":
                delta = 1.0 / (10 * n_patients)
            else:
                delta = float(privacy.delta)
                if delta >= 1.0 / n_patients:
                    raise ValueError(
                        f"site {self.site}: privacy.delta {delta:.3g} is not below 1/n = {1.0 / n_patients:.3g} "
                        f"for its {n_patients} training patients; such a delta allows releasing one patient's "
                        "data outright: use 'auto' (1 / (10 n)) or a smaller number")
            if self.delta() is not None:  # a later stage: one delta for the site's whole run
                delta = min(delta, float(self.delta()))  # type: ignore[arg-type]
            if privacy.target_epsilon is not None:
                plan = [(q, planned_rounds * epochs * steps) for q, steps in rates.values()]
                sigma = calibrate_noise(privacy.target_epsilon, delta, plan, privacy.accountant)
            else:
                sigma = float(privacy.noise_multiplier)  # type: ignore[arg-type]
            st = {**asked, "delta": delta, "noise_multiplier_used": sigma, "history": [], "rounds": [],
                  "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
            self.data["stages"][stage] = st
        else:
            changed = {k: (st.get(k), v) for k, v in asked.items() if st.get(k) != v}
            if changed:
                what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ValueError(f"site {self.site}: the DP settings of run {self.run_id} changed since its first "
                                 f"{stage} round ({what}); a run keeps its DP settings: start a new run")
        plan_ = RoundPlan(stage, float(st["noise_multiplier_used"]), float(st["max_grad_norm"]), float(st["delta"]),
                          str(st["accountant"]), self.secret, {k: q for k, (q, _) in rates.items()},
                          {k: epochs * s for k, (_, s) in rates.items()})
        plan_.accountant = make_accountant(plan_.mechanism, self.history(stage))
        return plan_

    def check_budget(self, plan: RoundPlan, budget: float | None) -> tuple[float, float]:
        """``(spent, after)``: the site's epsilon for this run so far and after ``plan``'s round.

        Raises
        ------
        client.stats_service.PolicyRefusal
            Rule ``epsilon_budget``, when ``after`` exceeds the site's own ``budget``.
        """
        spent = self.epsilon()
        after = epsilon_of(plan.mechanism, self.history() + plan.history(), plan.delta)
        if budget is not None and after > budget:
            from client.stats_service import PolicyRefusal

            raise PolicyRefusal("epsilon_budget", (
                f"site {self.site} will not train this {plan.stage} round of run {self.run_id}: its epsilon budget "
                f"(policy.epsilon_budget) is {budget:g}, it has spent {spent:.4g}, and this round would cost "
                f"{after - spent:.4g} more (total {after:.4g}, delta {plan.delta:.3g}, noise multiplier "
                f"{plan.noise_multiplier:.4g})"))
        return spent, after

    def commit(self, plan: RoundPlan, server_round: int) -> dict[str, float]:
        """Record the round ``plan``'s accountant took (its history replaces the stage's), save, return metrics."""
        st = self.data["stages"][plan.stage]
        st["history"] = [list(h) for h in plan.accountant.state_dict()["history"]]
        eps = self.epsilon(plan.stage)
        st["rounds"].append({"round": int(server_round), "steps": int(sum(plan.steps.values())),
                             "epsilon": eps, "at": datetime.now(UTC).isoformat(timespec="seconds")})
        self.save()
        return self.metrics(plan.stage)

    def metrics(self, stage: str) -> dict[str, float]:
        """What a training reply carries about the spend: numbers about the site's noise, none about a patient.

        ``epsilon`` (the stage's, so far), ``dp-delta``, ``dp-noise-multiplier``, ``dp-max-grad-norm``,
        ``dp-sample-rate`` (the largest backbone's), ``dp-steps`` and ``dp-rounds`` (this stage, so far).
        """
        st = self.stage(stage)
        if st is None:
            return {}
        hist = self.history(stage)
        return {"epsilon": self.epsilon(stage), "dp-delta": float(st["delta"]),
                "dp-noise-multiplier": float(st["noise_multiplier_used"]),
                "dp-max-grad-norm": float(st["max_grad_norm"]),
                "dp-sample-rate": max((float(q) for _, q, _ in hist), default=0.0),
                "dp-steps": float(sum(int(s) for _, _, s in hist)), "dp-rounds": float(len(st["rounds"]))}
