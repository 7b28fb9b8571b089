"""Simulated hospitals' statistics endpoints in one process, and their consortium identities.

Simulation only. Each simulated site gets its own :class:`client.stats_service.StatsService` over its
own table and cache folder, its own identity key and the consortium roster, exactly as a real site
has them; the in-process transport passes every request and reply through the same wire encoding as
Flower messages (:mod:`shared.wire`), so what a test or a baseline computes is what a federation
computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.site_policy import SiteRules, read_stamps, roster_from, secagg_factory
from client.stats_service import SiteContext, StatsService
from shared.config import PolicyConfig
from shared.wire import pack, unpack

logger = logging.getLogger(__name__)


def make_consortium_keys(root: Path, sites: list[str]) -> dict[str, Path]:
    """Identity keys for simulated sites: ``root/sites/<name>/site.key|site.pub`` (keys 0600); reused if present.

    Returns ``{site: private key path}``; ``root`` is the roster folder every site trusts.
    """
    out = {}
    for name in sites:
        d = Path(root) / "sites" / name
        key_path, pub_path = d / "site.key", d / "site.pub"
        if not key_path.is_file():
            d.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP384R1())
            import os

            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
            pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                               serialization.PublicFormat.OpenSSH)
                                 + f" rectalfl-site-{name}\n".encode())
        out[name] = key_path
    return out


def site_service(site: str, cache_dir: Path, policy: PolicyConfig, clinical: list[str] | tuple[str, ...],
                 table: Callable[[], pd.DataFrame], identity_key: Path | None) -> StatsService:
    """A simulated site's statistics service (its own policy, table, cache and key)."""
    rules = SiteRules(policy, tuple(clinical), identity_key, "simulation")
    ctx = SiteContext(site=site, cache_dir=Path(cache_dir), policy=policy, clinical_columns=tuple(clinical),
                      table=table, stamps=lambda: read_stamps(Path(cache_dir)),
                      secagg=secagg_factory(site, rules, Path(cache_dir)))
    return StatsService(ctx)


def inprocess_transport(services: Mapping[str, StatsService], run: str,
                        fail: Callable[[str, dict], bool] | None = None) -> Callable[[dict], dict]:
    """``{site: request} -> {site: reply}`` through the wire encoding; ``fail(site, request)`` drops a reply."""

    def send(requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for site, req in requests.items():
            if site not in services or (fail is not None and fail(site, req)):
                continue
            text, arrays = pack(req)
            reply = services[site].handle(run, unpack(text, arrays))
            text, arrays = pack(reply)
            out[site] = unpack(text, arrays)
        return out

    return send


def roster(root: Path) -> dict[str, Path]:
    """The roster a simulated site trusts (``root/sites/*/site.pub``)."""
    return roster_from(root)


def prepare_site_policies(cfg: Any, sites: list[dict], external: set[str]) -> dict[str, Path]:
    """Give every simulated hospital its own policy file, identity key and the consortium roster.

    Each site's policy is ``site_policies[name]`` (else ``policy``) with the roster and key of the
    simulated consortium filled in (``<cache_root>/.consortium``) and its role set from the cohort,
    written to ``<its cache>/site_policy.json`` where its ClientApp reads it. Returns the policy paths.
    """
    from client.site_policy import write_simulated_policy

    root = Path(cfg.cache_root).resolve() / ".consortium"
    keys = make_consortium_keys(root, [s["name"] for s in sites])
    out = {}
    for s in sites:
        name = s["name"]
        base = cfg.site_policies.get(name, cfg.policy)
        pol = base.model_copy(update={
            "roster": base.roster or root, "identity_key": base.identity_key or keys[name],
            "role": base.role or ("external" if name in external else "train")})
        out[name] = write_simulated_policy(Path(s["cache_dir"]), pol, list(cfg.fusion.clinical_predictors))
    return out


def inprocess_stats_runner(cfg: Any, sites: list[dict], run: str) -> Callable[[list], list]:
    """Site-computed queries answered by the simulated sites in this process (baselines, tests).

    Each site's service reads its own policy file (:func:`prepare_site_policies` must have run), its
    own table and cache, exactly as its ClientApp would.
    """
    from client.site_policy import load_rules
    from client.site_table import SiteTables
    from shared.stats_driver import run_site_queries

    services = {}
    for s in sites:
        tables = SiteTables(s["name"], Path(s["data_dir"]), Path(s["cache_dir"]), cfg)
        rules = load_rules({}, Path(s["cache_dir"]), cfg)
        services[s["name"]] = site_service(s["name"], Path(s["cache_dir"]), rules.policy, rules.clinical_columns,
                                           tables.site_table, rules.identity_key)
    k = max([cfg.privacy.min_cell_count, *(svc.ctx.policy.min_cell_count for svc in services.values())])
    transport = inprocess_transport(services, run)

    def run_queries(queries: list) -> list:
        for svc in services.values():
            svc._table = None  # tables change between stages (signatures, scores): read them again
        roles = {s: ("external" if svc.ctx.policy.role == "external" else "train") for s, svc in services.items()}
        return run_site_queries(queries, transport, run=run, k=k, roles=roles)

    run_queries.min_count = lambda: k  # type: ignore[attr-defined]  # the run's k, for protocols built with it
    return run_queries


class InProcessConsortium:
    """Simulated sites held as tables in this process (tests, tools): the same site code, no Flower.

    Each site has its own cache folder (stamps, state, scores), identity key, and policy; its table
    is the given signatures + clinical columns joined with the fusion scores it wrote itself.

    Parameters
    ----------
    root : Path
        Where the sites' caches and the roster go.
    tables : mapping site -> DataFrame
        ``patient_id, split, label``, signatures, clinical predictors.
    roles : mapping site -> "train" | "external"
    clinical : sequence of str
        The declared clinical predictors (the allow-list's clinical part).
    run : str
        The run id the data are stamped with.
    policy : dict
        PolicyConfig fields for every site (``min_cell_count``, ``release_site_figures``, ...).
    """

    def __init__(self, root: Path, tables: Mapping[str, pd.DataFrame], roles: Mapping[str, str],
                 clinical: list[str] | tuple[str, ...], run: str = "run", **policy: Any) -> None:
        from client.site_policy import SIGNATURES_STAMP, write_stamp

        self.root, self.run, self.roles = Path(root), run, dict(roles)
        self.base = {s: t.assign(patient_id=t["patient_id"].astype(str)) for s, t in tables.items()}
        keys = make_consortium_keys(self.root / "roster", list(tables))
        self.services: dict[str, StatsService] = {}
        for s in tables:
            cache = self.cache(s)
            cache.mkdir(parents=True, exist_ok=True)
            write_stamp(cache / SIGNATURES_STAMP, run=run, weights="0" * 64)
            pol = PolicyConfig(roster=self.root / "roster", identity_key=keys[s], role=roles[s], **policy)
            self.services[s] = site_service(s, cache, pol, clinical, (lambda s=s: self.table(s)), keys[s])
        self.transport = inprocess_transport(self.services, run)
        self.k = max(svc.ctx.policy.min_cell_count for svc in self.services.values())

    def cache(self, site: str) -> Path:
        return self.root / "cache" / site

    def table(self, site: str) -> pd.DataFrame:
        from client.site_table import read_scores

        base = self.base[site]
        scores = read_scores(self.cache(site))
        return base if scores is None else base.merge(scores, on="patient_id", how="left", suffixes=("", "_score"))

    def run_stats(self, queries: list) -> list:
        from shared.stats_driver import run_site_queries

        for svc in self.services.values():
            svc._table, svc._data = None, {}
        return run_site_queries(queries, self.transport, run=self.run, k=self.k, roles=self.roles)

    def fusion(self, models: dict) -> dict[str, dict[str, Any]]:
        """Every site scores its patients with the models it derived itself (others are refused)."""
        from client.site_table import apply_fusion
        from client.stats_service import PolicyRefusal

        out = {}
        for s, svc in self.services.items():
            own = svc.derived_models(self.run)
            foreign = [n for n, m in models.items() if m.digest() not in own]
            if foreign:
                raise PolicyRefusal("models", f"site {s}: model(s) {foreign} were not derived by this site")
            out[s] = apply_fusion(self.base[s], models, self.cache(s), site=s, run_id=self.run)
        return out
