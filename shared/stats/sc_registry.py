"""Registry of the site-computed protocols by name: what a site service may instantiate.

A site builds a protocol only from this table (``SITE_PROTOCOLS[name].from_params(params)``); a
name outside it, or parameters outside the protocol's validated range, is refused (KeyError /
ValueError) before any data is read.
"""

from __future__ import annotations

from .sc_classification import CalibrationSite, NetBenefitSite, ThresholdMetricsSite
from .sc_cohort import CohortSummarySite
from .sc_logistic import LogisticSite, SelectionSite
from .sc_roc import ROCSite
from .sc_tableone import TableOneSite
from .sitecomputed import SiteComputedProtocol

#: Protocol classes by their ``name``.
SITE_PROTOCOLS: dict[str, type[SiteComputedProtocol]] = {
    p.name: p
    for p in (CohortSummarySite, ROCSite, ThresholdMetricsSite, CalibrationSite, NetBenefitSite, LogisticSite,
              SelectionSite, TableOneSite)
}


def build(name: str, params: dict) -> SiteComputedProtocol:
    """Instantiate a registered protocol from its JSON params (validated by its ``__init__``).

    Raises
    ------
    ValueError
        Unknown protocol name or invalid parameters (the message names which).
    """
    if name not in SITE_PROTOCOLS:
        raise ValueError(f"unknown site-computed protocol {name!r}; known: {sorted(SITE_PROTOCOLS)}")
    if not isinstance(params, dict):
        raise ValueError(f"params of {name!r} must be a mapping, got {type(params).__name__}")
    try:
        return SITE_PROTOCOLS[name].from_params(params)
    except TypeError as exc:  # unknown or missing keyword
        raise ValueError(f"invalid params for {name!r}: {exc}") from None
