"""The platform-free client algorithm: what a site does in each stage, with no Flower in sight.

``client.client_app`` only translates Flower messages into calls of :class:`SiteAlgorithm` and its
results back into records, so the science is testable without a federation and the same object
serves the simulation engine, the deployment engine and the in-process baselines.

What leaves the site through these methods: model weights, the number of training cases, mean
losses, and score summaries from :mod:`shared.stats` (class-conditional counts with disclosure
control). What stays: the slices, labels, per-patient signatures (``<cache>/signatures.csv``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from client.site_table import SiteTables
from client.train import (
    DPSGD,
    SliceSet,
    assign_splits,
    initial_states,
    load_slice_sets,
    mean_loss,
    models_from_states,
    predict,
    resolve_device,
    signature_keys,
    stable_seed,
    train_backbone,
    training_seed,
)
from shared.config import RectalFLConfig

logger = logging.getLogger(__name__)

States = dict[str, OrderedDict[str, torch.Tensor]]


@dataclass
class FitResult:
    states: States
    num_examples: int
    """Training patients at this site (the FedAvg weight)."""
    metrics: dict[str, float]


class SiteAlgorithm(SiteTables):
    """A site's side of every stage (the table methods come from :class:`client.site_table.SiteTables`).

    Parameters
    ----------
    site : str
        Site name (appears in the run record; never a patient identifier).
    site_dir : Path
        The site's data folder (site data contract).
    cache_dir : Path
        The site's preprocessing cache; signatures are written here too.
    cfg : RectalFLConfig
        The run's configuration as sent by the server.
    """

    def __init__(self, site: str, site_dir: Path, cache_dir: Path, cfg: RectalFLConfig, *, device: str | None = None):
        super().__init__(site, site_dir, cache_dir, cfg)
        self.keys = signature_keys(cfg)
        self.device = resolve_device(device or cfg.train.device)

    # ------------------------------------------------------------------ data
    def ensure_cache(self) -> None:
        """Preprocess the site if its cache is missing or incomplete (resumable, so cheap when done)."""
        from client.preprocess import preprocess_site

        preprocess_site(self.site_dir, self.cache_dir, self.cfg)

    @cached_property
    def labels(self) -> pd.Series:
        """Outcome per patient, without the patients the exclusion rule removed (``<cache>/exclusions.csv``):
        they take part in no split, no training, no signature and no statistic."""
        from client.preprocess import excluded_patients
        from shared.cohort import load_patients

        df = load_patients(self.site_dir, self.cfg)
        labels = df.set_index(df["patient_id"].astype(str))["response"]
        out = excluded_patients(self.cache_dir)
        if out:
            logger.info("site %s: %d patient(s) excluded by the exclusion rule (see %s)", self.site,
                        len(out & set(labels.index)), self.cache_dir / "exclusions.csv")
        return labels[~labels.index.isin(out)]

    @cached_property
    def splits(self) -> pd.Series:
        return assign_splits(self.labels.dropna(), self.cfg.split.scheme, self.cfg.seed, self.site)

    @cached_property
    def data(self) -> dict[str, SliceSet]:
        manifest = self.cache_dir / "manifest.csv"
        if not manifest.is_file():
            self.ensure_cache()
            self.__dict__.pop("labels", None)  # the exclusions were (re)decided with the cache
            self.__dict__.pop("splits", None)
        return load_slice_sets(self.cache_dir, self.labels, self.splits, self.keys)

    def describe(self) -> dict[str, int]:
        """Counts only: patients per split (never ids)."""
        vc = self.splits.value_counts()
        return {f"patients-{s}": int(vc.get(s, 0)) for s in ("train", "val", "test")}

    # ------------------------------------------------------------------ stages
    def fit(self, states: States, server_round: int, *, proximal_mu: float = 0.0, epochs: int | None = None,
            run_id: str | None = None, epsilon_budget: float | None = None, stage: str = "train") -> FitResult:
        """One local update of every backbone, starting from the global ``states``.

        With ``privacy.dp`` the update is DP-SGD (:func:`client.train.train_backbone_dp`), accounted in
        the site's privacy ledger of ``run_id`` (:mod:`client.privacy_ledger`); a round that would take
        the site's epsilon for the run past ``epsilon_budget`` (its own ``policy.epsilon_budget``) is
        refused before any training, and so is every round of a run without DP when a budget is set.
        The reply's metrics then carry ``epsilon`` (the stage's so far) and the DP settings, and no
        training loss (a loss is a statistic of the patients that DP does not cover).

        Raises
        ------
        client.stats_service.PolicyRefusal
            Rule ``epsilon_budget``: the budget forbids this round.
        """
        epochs = epochs or self.cfg.train.local_epochs
        dp = self.cfg.privacy.dp
        if epsilon_budget is not None and not dp:
            from client.stats_service import PolicyRefusal

            raise PolicyRefusal("epsilon_budget", (
                f"site {self.site} trains only with differential privacy (its policy.epsilon_budget is "
                f"{epsilon_budget:g}) and run {run_id or '?'} has privacy.dp false"))
        models = models_from_states(self.cfg, states)
        train_sets = {key: self.data[key].subset(["train"]) for key in self.keys}
        train_ids = set().union(*(d.patient_ids for d in train_sets.values()))
        ledger = plan = None
        if dp:
            from client.privacy_ledger import PrivacyLedger

            ledger = PrivacyLedger.open(self.cache_dir, run_id or "", self.site)
            plan = ledger.plan(stage, self.cfg.privacy, {k: len(d) for k, d in train_sets.items()}, len(train_ids),
                               batch_size=self.cfg.train.batch_size, epochs=epochs,
                               planned_rounds=self.cfg.federation.rounds)
            spent, after = ledger.check_budget(plan, epsilon_budget)
            logger.info("site %s round %d: DP-SGD (noise %.3g, clip %g); epsilon %.3f -> %.3f of budget %s",
                        self.site, server_round, plan.noise_multiplier, plan.max_grad_norm, spent, after,
                        "none" if epsilon_budget is None else f"{epsilon_budget:g}")
        metrics: dict[str, float] = {}
        local_norm = self.cfg.federation.norm_stats == "local" and self.cfg.federation.mode == "federated"
        keep_opt = self.cfg.train.keep_optimizer_state and run_id is not None
        if local_norm and run_id is not None:  # this site's own statistics, not the averaged ones
            from client.site_state import apply_norm_stats, load_norm_stats

            kept = load_norm_stats(self.cache_dir, run_id)
            if kept is not None:
                own, changed = apply_norm_stats(states, kept)
                models = models_from_states(self.cfg, own)
                metrics["norm-stats-local"] = float(len(changed))
        out: States = {}
        for key in self.keys:
            data = train_sets[key]
            opt_state = None
            if keep_opt:
                from client.site_state import load_optimizer_state

                opt_state = load_optimizer_state(self.cache_dir, run_id or "", key)
            stats = train_backbone(
                models[key], data, self.cfg.train, epochs=epochs,
                seed=stable_seed(training_seed(self.cfg), "fit", self.site, key, server_round), device=self.device,
                global_state=states[key] if proximal_mu > 0 else None, proximal_mu=proximal_mu,
                dp=plan.for_backbone(key, epochs) if plan is not None and len(data) else None,
                max_steps=self.cfg.train.local_steps if plan is None else None, optimizer_state=opt_state,
            )
            if keep_opt and stats.optimizer_state is not None:
                from client.site_state import save_optimizer_state

                save_optimizer_state(self.cache_dir, run_id or "", key, stats.optimizer_state)
            out[key] = OrderedDict((k, v.detach().clone()) for k, v in models[key].state_dict().items())
            if plan is None:
                metrics[f"{key}/train-loss"] = stats.loss_last_epoch
            else:
                logger.info("site %s round %d %s: DP training loss %.4f (kept on site)", self.site, server_round, key,
                            stats.loss_last_epoch)
            metrics[f"{key}/n"] = float(stats.n_examples)
            metrics[f"{key}/steps"] = float(stats.steps)
            metrics[f"{key}/seconds"] = stats.seconds
        if local_norm and run_id is not None:
            from client.site_state import save_norm_stats

            save_norm_stats(self.cache_dir, run_id, out)
        metrics["fit-seconds"] = float(sum(v for k, v in metrics.items() if k.endswith("/seconds")))
        if plan is None:
            losses = [v for k, v in metrics.items() if k.endswith("/train-loss") and np.isfinite(v)]
            metrics["train-loss"] = float(np.mean(losses)) if losses else float("nan")
        else:
            metrics.update(ledger.commit(plan, server_round))  # type: ignore[union-attr]
        return FitResult(out, len(train_ids), metrics)

    def evaluate_loss(self, states: States, split: str = "val") -> dict[str, float]:
        """Mean BCE per backbone on one split (aggregate numbers only)."""
        models = models_from_states(self.cfg, states)
        res = {}
        for key in self.keys:
            data = self.data[key].subset([split])
            res[f"{key}/{split}-loss"] = mean_loss(models[key], data, self.device)
            res[f"{key}/{split}-n"] = float(len(data))
        return res

    def _own_norm_stats(self, states: States, models: dict[str, Any], run_id: str | None) -> dict[str, Any]:
        """``norm_stats: local``: the statistics this site kept from its own training, else (an external site,
        or a site that never trained in this run) re-estimated on all of its images, without labels."""
        from client.site_state import apply_norm_stats, load_norm_stats
        from client.train import recompute_norm_stats

        kept = load_norm_stats(self.cache_dir, run_id) if run_id else None
        if kept is not None:
            own, changed = apply_norm_stats(states, kept)
            if set(changed) >= set(self.keys):
                logger.info("site %s: signatures with its own normalisation statistics", self.site)
                return models_from_states(self.cfg, own)
        for key in self.keys:
            n = recompute_norm_stats(models[key], self.data[key], device=self.device)
            logger.info("site %s %s: %d normalisation layer(s) re-estimated on %d images (no labels)", self.site,
                        key, n, len(self.data[key]))
        return models

    def signatures(self, states: States, *, external: bool = False, run_id: str | None = None) -> pd.DataFrame:
        """Every patient's deep-learning signatures, written to ``<cache>/signatures.csv`` (stays on site).

        Returns
        -------
        DataFrame of shape (n_patients, 2 + n_keys + n_deltas)
            patient_id, split (``external`` for an external site), label, one column per
            backbone, and ``delta_<seq>`` = pre - post where both exist.
        """
        models = models_from_states(self.cfg, states)
        if self.cfg.federation.norm_stats == "local" and self.cfg.federation.mode == "federated":
            models = self._own_norm_stats(states, models, run_id)
        table = pd.DataFrame({"patient_id": self.labels.index.astype(str)}).set_index("patient_id")
        table["split"] = "external" if external else self.splits.reindex(table.index)
        table["label"] = self.labels
        for key in self.keys:
            data = self.data[key]
            probs = predict(models[key], data, device=self.device)
            if len(probs) and not np.isfinite(probs).all():
                raise ValueError(f"site {self.site}: backbone {key} gives non-finite outputs for "
                                 f"{int((~np.isfinite(probs)).sum())} of {len(probs)} patients: the model received is "
                                 "broken (e.g. a server optimiser that diverged); no signature was written")
            table[key] = pd.Series(probs, index=pd.Index(data.patient_ids, dtype=object), dtype=float)
        for seq in self.cfg.data.sequences:
            if f"pre_{seq}" in table and f"post_{seq}" in table:
                table[f"delta_{seq}"] = table[f"pre_{seq}"] - table[f"post_{seq}"]
        table = table.reset_index()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / "signatures.csv.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(self.cache_dir / "signatures.csv")
        if run_id is not None:  # which run and weights made them: statistics for another run are refused
            from client.site_policy import SIGNATURES_STAMP, digest_arrays, write_stamp
            from shared.records import flatten_states

            write_stamp(self.cache_dir / SIGNATURES_STAMP, run=run_id, weights=digest_arrays(flatten_states(states)))
        return table



def fresh_states(cfg: RectalFLConfig) -> States:
    return initial_states(cfg)


class BaselinePrivacy:
    """DP-SGD for the simulation's pooled/local baselines: one accountant over the cases trained together.

    The pooled baseline trains once on the union of the training sites' cases: its accountant, delta
    (1 / (10 n) over all those patients) and sample rates are those of the pooled training set; a local
    baseline has one per site. Training takes ``rounds * local_epochs`` epochs in one go, as the
    baseline does. Kept in memory (one process trains and reports).

    Parameters
    ----------
    cfg : RectalFLConfig
    sites : list of SiteAlgorithm
        The sites whose training cases are pooled (one for a local baseline).
    name : str
        The baseline's name (``pooled``, ``local-<site>``).
    """

    stage = "train"

    def __init__(self, cfg: RectalFLConfig, sites: list[SiteAlgorithm], name: str) -> None:
        from client.privacy_ledger import PrivacyLedger

        self.epochs = cfg.federation.rounds * cfg.train.local_epochs
        keys = sites[0].keys
        sizes = {k: sum(len(s.data[k].subset(["train"])) for s in sites) for k in keys}
        patients = {(s.site, p) for s in sites for k in keys for p in s.data[k].subset(["train"]).patient_ids}
        self.ledger = PrivacyLedger.in_memory(name)
        self.plan = self.ledger.plan(self.stage, cfg.privacy, sizes, len(patients), batch_size=cfg.train.batch_size,
                                     epochs=self.epochs, planned_rounds=1)

    def dp(self, key: str, n: int) -> DPSGD | None:
        """The backbone's DP-SGD settings (None for a backbone without cases)."""
        return self.plan.for_backbone(key, self.epochs) if n else None

    def finish(self) -> dict[str, float]:
        """Epsilon and settings after training (for the run record: key ``epsilon``, ``dp-*``)."""
        return self.ledger.commit(self.plan, 1)


def baseline_privacy(cfg: RectalFLConfig, sites: list[SiteAlgorithm], name: str) -> BaselinePrivacy | None:
    """:class:`BaselinePrivacy` when ``privacy.dp`` is on, else None (the baselines' one switch)."""
    return BaselinePrivacy(cfg, sites, name) if cfg.privacy.dp else None
