"""Where a site's own rules come from, and its identity for secure aggregation.

The policy is the hospital's (:class:`shared.config.PolicyConfig`), read on the site's side only:

- a real site: the site config file it joined with (``rectalfl site join --config site.yaml`` passes
  its path to the SuperNode as node config ``site-config``);
- a simulated site: ``<cache>/site_policy.json``, written into each simulated hospital's own cache
  folder by the simulation (:func:`write_simulated_policy`);
- otherwise the schema's defaults (``min_cell_count`` 5, no per-site figures, no roster: the site
  then answers only questions about its own patients, which its default policy does not release).

Secure aggregation needs the consortium roster (``policy.roster``: a folder with
``sites/<name>/site.pub`` or ``<name>/site.pub``, as ``rectalfl certs add-site`` writes) and the
site's private key (``policy.identity_key``, default ``deploy.site_key``, else the key ``rectalfl site
join --key`` gave the SuperNode: node config ``site-key``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import PolicyConfig, RectalFLConfig, load_config

logger = logging.getLogger(__name__)

POLICY_FILE = "site_policy.json"
SIGNATURES_STAMP = "signatures.stamp.json"
SCORES_STAMP = "fusion_scores.stamp.json"


@dataclass(frozen=True)
class SiteRules:
    """A site's own policy and the column allow-list's clinical part."""

    policy: PolicyConfig
    clinical_columns: tuple[str, ...]
    identity_key: Path | None
    source: str


def roster_from(folder: Path) -> dict[str, Path]:
    """``{site: site.pub}`` from a roster folder (``sites/<name>/site.pub`` or ``<name>/site.pub``)."""
    folder = Path(folder)
    base = folder / "sites" if (folder / "sites").is_dir() else folder
    if not base.is_dir():
        raise FileNotFoundError(f"roster folder {folder} not found (policy.roster)")
    out = {p.parent.name: p for p in sorted(base.glob("*/site.pub"))}
    if not out:
        raise FileNotFoundError(f"no <site>/site.pub in the roster folder {base} (policy.roster)")
    return out


def load_rules(node_config: Mapping[str, Any], cache_dir: Path, run_cfg: RectalFLConfig) -> SiteRules:
    """The site's own rules (see the module docstring); never from a server message.

    ``run_cfg`` (the server's recipe) is used only for what is not a rule: nothing here is taken
    from it.
    """
    path = node_config.get("site-config")
    if path:
        cfg = load_config(str(path))
        key = cfg.policy.identity_key or cfg.deploy.site_key or node_config.get("site-key")
        return SiteRules(cfg.policy, tuple(cfg.fusion.clinical_predictors), Path(key) if key else None, str(path))
    file = Path(cache_dir) / POLICY_FILE
    if file.is_file():
        data = json.loads(file.read_text())
        pol = PolicyConfig.model_validate(data["policy"])
        key = pol.identity_key
        return SiteRules(pol, tuple(data.get("clinical_columns", [])), Path(key) if key else None, str(file))
    del run_cfg
    return SiteRules(PolicyConfig(), (), None, "defaults")


def write_simulated_policy(cache_dir: Path, policy: PolicyConfig, clinical_columns: list[str]) -> Path:
    """Simulation: a simulated hospital's own policy file in its own cache folder (mode 0600)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / POLICY_FILE
    tmp = path.with_name(f".{POLICY_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"policy": policy.model_dump(mode="json"), "clinical_columns": list(clinical_columns)}, fh,
                  indent=2)
    os.replace(tmp, path)
    return path


def secagg_factory(site: str, rules: SiteRules, cache_dir: Path) -> Any:
    """A callable making this site's :class:`shared.secagg.SiteSecAgg`, or None without a roster/key."""
    if rules.policy.roster is None or rules.identity_key is None:
        return None

    def make() -> Any:
        from shared.secagg import SiteSecAgg

        return SiteSecAgg(site, rules.identity_key, roster_from(rules.policy.roster), Path(cache_dir) / "secagg",
                          min_sites=2)

    return make


def write_stamp(path: Path, **fields: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(fields, sort_keys=True))
    os.replace(tmp, path)


def read_stamps(cache_dir: Path) -> dict[str, dict[str, str]]:
    out = {}
    for name, file in (("signatures", SIGNATURES_STAMP), ("scores", SCORES_STAMP)):
        p = Path(cache_dir) / file
        if p.is_file():
            out[name] = json.loads(p.read_text())
    return out


def digest_arrays(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over named arrays (weights, model parameters), order-independent."""
    import numpy as np

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[k]))
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()
