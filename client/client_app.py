"""Flower ClientApp: a thin adapter from messages to :class:`client.algorithm.SiteAlgorithm`.

Message types it answers (Flower Message API):

``query.describe``
    site name, its own disclosure floor and role, patients per split (a count below the floor is
    sent as -1).
``train``
    one local update of every backbone from the global weights (one ArrayRecord, prefixed keys);
    replies with the new weights, ``num-examples`` = the site's true number of training patients,
    and mean training losses.
``train.secagg``
    with ``federation.secure_aggregation``: sets up the training stage's secure-aggregation session
    (advertise, share); each ``train`` reply then carries the site's weighted update masked in it
    (:mod:`client.secure_updates`), so the server reads only the sum over the sites.
``evaluate.signatures``
    with the final weights: computes every patient's signatures and keeps them on site
    (``<cache>/signatures.csv``); replies only with the number of patients.
``evaluate.stats``
    site-computed statistics (:mod:`client.stats_service`): every query checked against the site's
    own policy; contributions leave only securely aggregated; only disclosure-checked releases
    leave in the clear. A request the policy refuses gets an error reply with code
    :data:`POLICY_REFUSED_CODE` naming the rule.
``evaluate.fusion``
    scores every patient with the fitted fusion models, only those this site derived itself
    (kept on site, stamped); replies with counts.

Every message and reply is appended to ``<cache>/audit.jsonl`` (``rectalfl site audit``).

Which site this node is: ``node_config`` keys ``site-name``, ``data-dir``, ``cache-dir``, ``site-config``
(its own config file: the policy) and optionally ``device`` on the Deployment Engine. On the simulation engine the virtual node's
``partition-id`` indexes the ``sim-sites`` list the server sends (a simulated consortium on one
machine); nothing else assumes a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from client.site_table import SiteTables
from shared.config import parse_config
from shared.records import (
    LAYOUT_KEY,
    arrays_to_record,
    flatten_states,
    message_arrays,
    pack_arrays,
    pack_json,
    record_to_arrays,
    states_to_record,
    unflatten_states,
    unpack_json,
)

logger = logging.getLogger(__name__)

app = ClientApp()

_CACHE: dict[tuple[str, str, bool], SiteTables] = {}
SITE_ERROR_CODE = 4200
POLICY_REFUSED_CODE = 4300
"""Error code of a reply refused by the site's own policy (the reason names the rule)."""


def site_identity(node_config: dict, sim_sites: list[dict] | None) -> dict:
    """Resolve which site this node is, from node_config (deployment) or partition-id (simulation)."""
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"]))
        return {
            "name": str(node_config.get("site-name", data_dir.name)),
            "data_dir": str(data_dir),
            "cache_dir": str(node_config.get("cache-dir", data_dir / ".rectalfl_cache")),
            "device": node_config.get("device"),
        }
    if sim_sites is not None and "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(sim_sites):
            raise ValueError(f"simulation node partition-id {pid} has no site (the run lists {len(sim_sites)} sites)")
        return dict(sim_sites[pid])
    raise ValueError(
        "this SuperNode does not know its site: start it with --node-config \"site-name='NAME' "
        "data-dir='/path/to/site' cache-dir='/path/to/cache'\" (see README, 'Real sites')"
    )


def _algorithm(msg: Message, context: Context, light: bool = False) -> SiteTables:
    """The site's algorithm object; ``light`` = tables only (no torch import: fast process start)."""
    conf = msg.content["config"]
    cfg_yaml = str(conf["rectalfl-config"])
    sim_sites = unpack_json(str(conf["sim-sites"])) if "sim-sites" in conf else None
    ident = site_identity(dict(context.node_config), sim_sites)
    key = (ident["name"], cfg_yaml, light)
    if key not in _CACHE:
        import yaml

        cfg = parse_config(yaml.safe_load(cfg_yaml), source="config sent by the server")
        if light:
            factory: type[SiteTables] = SiteTables
        else:
            from client.algorithm import SiteAlgorithm

            factory = SiteAlgorithm
        _CACHE[key] = factory(ident["name"], Path(ident["data_dir"]), Path(ident["cache_dir"]), cfg,
                                    device=ident.get("device"))
    return _CACHE[key]


def _bytes(content: RecordDict) -> int:
    return int(sum(r.count_bytes() for r in content.values()))


def audit(algo: SiteTables, msg: Message, reply: Message, *, refused: dict[str, str] | None = None) -> Message:
    """Append what this site received and sent to ``<cache>/audit.jsonl`` (the site's own record).

    Hospital IT can read there every message the server sent and, for every reply, which records
    and keys left the site and how many bytes, and every request its policy refused with the rule
    (``rectalfl site audit`` shows it; ``--html`` for the data-protection officer). ``refused``:
    query -> policy rule, for statistics queries the policy turned down.
    """
    conf = msg.content["config"] if "config" in msg.content else {}
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "message_type": msg.metadata.message_type,
        "server_round": int(conf.get("server-round", 0)) if conf else 0,
        "bytes_in": _bytes(msg.content),
    }
    if conf and "run-id" in conf:
        entry["run_id"] = str(conf["run-id"])
    if reply.has_error():
        entry.update(error=reply.error.reason, bytes_out=0, sent={})
        if reply.error.code == POLICY_REFUSED_CODE:
            m = re.search(r"refused by site policy \(([a-z_]+)\)", reply.error.reason or "")
            entry.update(refused=reply.error.reason, policy_rule=m.group(1) if m else None)
    else:
        entry.update(bytes_out=_bytes(reply.content),
                     sent={name: sorted(rec.keys()) if not isinstance(rec, ArrayRecord) else
                           f"{len(rec)} arrays" for name, rec in reply.content.items()})
    if refused:
        entry.update(refused="; ".join(f"{q}: {r}" for q, r in sorted(refused.items())),
                     policy_rule=",".join(sorted(set(refused.values()))))
    algo.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(algo.cache_dir / "audit.jsonl", "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return reply


def _error_reply(msg: Message, site: str | None, exc: BaseException) -> Message:
    where = f"site {site}" if site else "a site"
    reason = f"{where} failed: {type(exc).__name__}: {exc}"
    logger.error("%s\n%s", reason, traceback.format_exc())
    return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)


def _reply(msg: Message, context: Context, work: Callable[[Any, Message], RecordDict], *,
           light: bool = False) -> Message:
    """Run one stage for this site; any failure goes back to the server as an error naming the site.

    Every reply carries ``site.name`` and is appended to the site's audit log.
    """
    from client.stats_service import PolicyRefusal

    algo = None
    try:
        algo = _algorithm(msg, context, light)
        content = work(algo, msg)
        content["site"] = ConfigRecord({"name": algo.site})
        return audit(algo, msg, Message(content, reply_to=msg))
    except PolicyRefusal as exc:
        logger.warning("%s", exc)
        reply = Message(Error(code=POLICY_REFUSED_CODE, reason=f"site {algo.site if algo else '?'}: {exc}"),
                        reply_to=msg)
        return audit(algo, msg, reply) if algo else reply
    except Exception as exc:  # noqa: BLE001 - the server records it with the site's name
        reply = _error_reply(msg, algo.site if algo else None, exc)
        return audit(algo, msg, reply) if algo else reply


def _describe(algo: Any, msg: Message, context: Context) -> RecordDict:
    """Who this site is: its name, its own disclosure floor and role, and patients per split.

    A split count below the site's floor ``k`` is sent as -1 ("fewer than k"), never exactly.
    """
    from client.site_policy import load_rules

    rules = load_rules(dict(context.node_config), algo.cache_dir, algo.cfg)
    k = rules.policy.min_cell_count
    counts = {name: (int(v) if v == 0 or v >= k else -1) for name, v in algo.describe().items()}
    info = {"site": algo.site, **counts, "min-cell-count": k, "role": rules.policy.role or ""}
    return RecordDict({"info": ConfigRecord({"info": pack_json(info)})})


def _train(algo: Any, msg: Message, context: Context | None = None) -> RecordDict:
    from client.stats_service import PolicyRefusal

    conf = msg.content["config"]
    received = message_arrays(msg.content)
    states = unflatten_states(received)
    budget, rules = None, None
    if context is not None:  # the hospital's own epsilon budget and update rule: its policy, never the message
        from client.site_policy import load_rules

        rules = load_rules(dict(context.node_config), algo.cache_dir, algo.cfg)
        budget = rules.policy.epsilon_budget
    session = str(conf["secagg-session"]) if "secagg-session" in conf else None
    if session is None and rules is not None and rules.policy.secure_updates:
        raise PolicyRefusal("secure_updates", "this site sends model updates only securely aggregated; set "
                                              "federation.secure_aggregation: true in the run config")
    res = algo.fit(states, int(conf["server-round"]), proximal_mu=float(conf.get("proximal-mu", 0.0)),
                   run_id=str(conf["run-id"]) if "run-id" in conf else None, epsilon_budget=budget)
    metrics = MetricRecord({"num-examples": res.num_examples, **res.metrics})
    layout = conf.get(LAYOUT_KEY)  # weights packed by the server: reply in the same layout
    arrays = pack_arrays(flatten_states(res.states), str(layout))[0] if layout else states_to_record(res.states)
    if session is not None:  # only the weighted sum over the sites can be read by the server
        from client.secure_updates import mask_update
        from shared.secure_updates import weights_digest
        from shared.wire import unpack, unpack_bytes

        envelopes = None
        if "secagg" in conf:
            extra = unpack_bytes(conf["secagg-arrays"]) if "secagg-arrays" in conf else {}
            envelopes = unpack(str(conf["secagg"]), extra)["envelopes"]
        masked = mask_update(_secagg(algo, context, rules), algo.cache_dir, site=algo.site, session=session,
                             envelopes=envelopes, arrays=record_to_arrays(arrays), n=res.num_examples,
                             weights_digest=weights_digest(received))
        arrays = arrays_to_record(masked)
    return RecordDict({"arrays": arrays, "metrics": metrics})


def _secagg(algo: Any, context: Context | None, rules: Any = None) -> Any:
    """This site's :class:`shared.secagg.SiteSecAgg` (its own key and roster), or a policy refusal without one.

    ``rules``: the site's rules when the caller has loaded them already (else read from node config).
    """
    from client.site_policy import load_rules, secagg_factory
    from client.stats_service import PolicyRefusal

    if context is None:
        raise PolicyRefusal("roster", "no node configuration: secure aggregation needs the site's key and roster")
    rules = rules or load_rules(dict(context.node_config), algo.cache_dir, algo.cfg)
    make = secagg_factory(algo.site, rules, algo.cache_dir)
    if make is None:
        raise PolicyRefusal("roster", f"site {algo.site} has no consortium roster and identity key (policy.roster, "
                                      "policy.identity_key): it cannot take part in secure aggregation")
    return make()


def _secagg_setup(algo: Any, msg: Message, context: Context) -> RecordDict:
    from client.secure_updates import setup
    from shared.wire import pack, pack_bytes, unpack, unpack_bytes

    conf = msg.content["config"]
    arrays = unpack_bytes(conf["request-arrays"]) if "request-arrays" in conf else {}
    request = {**unpack(str(conf["request"]), arrays), "run": _run_id(msg) or ""}
    text, out = pack(setup(_secagg(algo, context), request))
    return RecordDict({"reply": ConfigRecord({"json": text, "arrays": pack_bytes(out)})})


def _run_id(msg: Message) -> str | None:
    conf = msg.content["config"]
    return str(conf["run-id"]) if "run-id" in conf else None


def _signatures(algo: Any, msg: Message) -> RecordDict:
    states = unflatten_states(message_arrays(msg.content))
    table = algo.signatures(states, external=bool(msg.content["config"].get("external", False)),
                            run_id=_run_id(msg))
    return RecordDict({"metrics": MetricRecord({"patients-with-signatures": int(len(table))})})


def _fusion(algo: Any, msg: Message, context: Context) -> RecordDict:
    """Score with the fitted fusion models: only models this site derived itself (its own fit state)."""
    from client.stats_service import PolicyRefusal
    from shared.fusion import models_from_payload
    from shared.wire import unpack_bytes

    conf = msg.content["config"]
    models = models_from_payload(unpack_bytes(conf["fusion-arrays"]), unpack_json(str(conf["fusion-models"])))
    run = _run_id(msg)
    own = _site_service(algo, context).derived_models(run) if run else {}
    foreign = sorted(name for name, m in models.items() if m.digest() not in own)
    if foreign:
        raise PolicyRefusal("models", f"model(s) {foreign} were not derived by this site in run {run}: it scores "
                                      "patients only with fusion models its own fit produced")
    answer = algo.apply_fusion(models, run_id=run)
    return RecordDict({"metrics": MetricRecord({k: int(v) for k, v in answer.items()})})


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Who this site is and how many patients per split (counts only)."""
    return _reply(msg, context, lambda algo, m: _describe(algo, m, context))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local update of every backbone from the global weights.

    A round the site's policy refuses (its epsilon budget) is answered with the policy-refusal code
    and a reason naming the budget, the epsilon spent and what the round would cost.
    """
    return _reply(msg, context, lambda algo, m: _train(algo, m, context))


@app.train("secagg")
def secagg_setup(msg: Message, context: Context) -> Message:
    """Secure aggregation of model updates: advertise / share the training stage's kept session."""
    return _reply(msg, context, lambda algo, m: _secagg_setup(algo, m, context), light=True)


@app.evaluate("signatures")
def signatures(msg: Message, context: Context) -> Message:
    """Compute every patient's signatures with the final weights and keep them on site."""
    return _reply(msg, context, _signatures)


@app.evaluate("fusion")
def fusion(msg: Message, context: Context) -> Message:
    """Score every patient with the fitted fusion models; scores and SHAP stay on site, SHAP sums go back."""
    return _reply(msg, context, lambda algo, m: _fusion(algo, m, context), light=True)


def _site_service(algo: Any, context: Context) -> Any:
    """This site's statistics service, under its own rules (node config / its cache; never the message)."""
    from client.site_policy import load_rules, read_stamps, secagg_factory
    from client.stats_service import SiteContext, StatsService

    rules = load_rules(dict(context.node_config), algo.cache_dir, algo.cfg)
    ctx = SiteContext(site=algo.site, cache_dir=algo.cache_dir, policy=rules.policy,
                      clinical_columns=rules.clinical_columns, table=algo.site_table,
                      stamps=lambda: read_stamps(algo.cache_dir), secagg=secagg_factory(algo.site, rules, algo.cache_dir))
    return StatsService(ctx)


def _stats(algo: Any, msg: Message, context: Context) -> tuple[RecordDict, dict[str, str]]:
    from shared.wire import pack, pack_bytes, unpack, unpack_bytes

    conf = msg.content["config"]
    run = _run_id(msg)
    if run is None:
        raise ValueError("statistics request without a run-id")
    arrays = unpack_bytes(conf["request-arrays"]) if "request-arrays" in conf else {}
    request = unpack(str(conf["request"]), arrays)
    reply = _site_service(algo, context).handle(run, request)
    refused = {str(q): str(r.get("rule", "?")) for q, r in (reply.get("refused") or {}).items()}
    text, out = pack(reply)  # one record, the arrays inside as bytes (one object on the wire, not one per array)
    return RecordDict({"reply": ConfigRecord({"json": text, "arrays": pack_bytes(out)})}), refused


@app.evaluate("stats")
def stats(msg: Message, context: Context) -> Message:
    """Site-computed statistics (``client.stats_service``): the site's policy decides; only releases leave."""
    from client.stats_service import PolicyRefusal

    algo = None
    try:
        algo = _algorithm(msg, context, light=True)
        content, refused = _stats(algo, msg, context)
        content["site"] = ConfigRecord({"name": algo.site})
        return audit(algo, msg, Message(content, reply_to=msg), refused=refused)
    except PolicyRefusal as exc:
        logger.warning("%s", exc)
        reply = Message(Error(code=POLICY_REFUSED_CODE, reason=f"site {algo.site if algo else '?'}: {exc}"),
                        reply_to=msg)
        return audit(algo, msg, reply) if algo else reply
    except Exception as exc:  # noqa: BLE001 - the server records it with the site's name
        reply = _error_reply(msg, algo.site if algo else None, exc)
        return audit(algo, msg, reply) if algo else reply
