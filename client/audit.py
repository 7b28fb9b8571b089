"""What left this site: reading and rendering the site's own audit log (``<cache>/audit.jsonl``).

The ClientApp appends one JSON line per message it received (``client.client_app.audit``): when,
which message type (the stage), the round, bytes in and out, which records and keys the reply
carried, and the error if the site answered with one. Later versions add ``run_id``, ``refused``
(a request the site's policy turned down) and ``policy_rule``; every field is read when present and
tolerated when absent, and unknown fields are kept (shown in the JSON output).

``rectalfl site audit --cache DIR`` prints every message with totals per run; ``--html FILE``
writes the same as one self-contained page (no scripts, no external references) that a
data-protection officer can open; ``--json`` prints it for machines. Nothing here touches the
network or the site's data: only the log.
"""

from __future__ import annotations

import html
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

__all__ = ["AuditEntry", "AuditError", "AuditReport", "RunAudit", "audit", "build_report", "read_audit",
           "render_html", "report_to_dict"]

AUDIT_FILE = "audit.jsonl"
UNKNOWN_RUN = "(run not recorded)"
KNOWN_FIELDS = {"time", "run_id", "message_type", "server_round", "bytes_in", "bytes_out", "sent", "error",
                "refused", "policy_rule"}
STAGE_NAMES = {
    "query.describe": "discovery: site name and patient counts per split",
    "train": "training round: model weights in, updated weights and losses out",
    "evaluate.signatures": "signatures computed and kept on site; only a patient count goes back",
    "evaluate.stats": "federated statistics: aggregate summaries with disclosure control",
    "evaluate.fusion": "fusion models applied on site; only sums and counts go back",
}


class AuditError(RuntimeError):
    """The audit log cannot be read, or the requested run is not in it; the message says what to do."""


@dataclass
class AuditEntry:
    """One message the site received, and what it answered."""

    line: int
    time: str | None
    run_id: str | None
    message_type: str
    server_round: int | None
    bytes_in: int
    bytes_out: int
    sent: dict[str, Any]
    error: str | None
    refused: bool
    refusal: str | None
    policy_rule: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """``'refused'``, ``'error'`` or ``'answered'``."""
        return "refused" if self.refused else "error" if self.error else "answered"

    def what_left(self) -> list[str]:
        """One line per record that left with the reply: ``'metrics: num-examples, train-loss'``."""
        out = []
        for name, keys in sorted(self.sent.items()):
            if isinstance(keys, list):
                out.append(f"{name}: {', '.join(str(k) for k in keys) if keys else '(empty)'}")
            else:
                out.append(f"{name}: {keys}")
        return out


@dataclass
class RunAudit:
    """Totals of one run (all messages with the same ``run_id``)."""

    run_id: str
    first: str | None
    last: str | None
    messages: int
    answered: int
    refused: int
    errors: int
    bytes_in: int
    bytes_out: int
    by_type: dict[str, dict[str, int]]
    keys_left: dict[str, list[str]]
    rules: dict[str, int]
    entries: list[AuditEntry]


@dataclass
class AuditReport:
    """Everything read from one audit log."""

    path: Path
    runs: list[RunAudit]
    problems: list[str]
    generated_at: str


def _audit_path(cache: Path) -> Path:
    cache = Path(cache)
    path = cache if cache.is_file() else cache / AUDIT_FILE
    if not path.is_file():
        if not cache.exists():
            raise AuditError(f"{cache} does not exist: give --cache the site's cache folder (the SuperNode's "
                             "node-config cache-dir, by default <data-dir>/.rectalfl_cache)")
        raise AuditError(f"no audit log at {path}: this site has not answered any message yet, or {cache} is not "
                         "the site's cache folder (the SuperNode's node-config cache-dir)")
    return path


def _int(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _entry(line: int, obj: dict[str, Any]) -> AuditEntry:
    refused_raw = obj.get("refused")
    refused = bool(refused_raw)
    refusal = refused_raw if isinstance(refused_raw, str) else None
    sent = obj.get("sent")
    run_id = obj.get("run_id")
    error = obj.get("error")
    rule = obj.get("policy_rule")
    return AuditEntry(
        line=line,
        time=str(obj["time"]) if obj.get("time") is not None else None,
        run_id=str(run_id) if run_id not in (None, "") else None,
        message_type=str(obj.get("message_type") or "(unknown)"),
        server_round=_int(obj.get("server_round")),
        bytes_in=_int(obj.get("bytes_in")) or 0,
        bytes_out=_int(obj.get("bytes_out")) or 0,
        sent=sent if isinstance(sent, dict) else {},
        error=str(error) if error else None,
        refused=refused,
        refusal=refusal,
        policy_rule=str(rule) if rule else None,
        extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
    )


def read_audit(cache: Path | str) -> tuple[Path, list[AuditEntry], list[str]]:
    """Read a site's audit log.

    Parameters
    ----------
    cache : Path or str
        The site's cache folder (holding ``audit.jsonl``) or the log file itself.

    Returns
    -------
    path : Path
        The log read.
    entries : list of AuditEntry
        In file order.
    problems : list of str
        One line per line that could not be read (``'line 17: not JSON (...)'``): such lines are
        reported, never silently dropped. A half-written last line (a process killed mid-write) is
        one of these.

    Raises
    ------
    AuditError
        No log there (the message names the folder and where the log normally is).
    """
    path = _audit_path(Path(cache))
    entries: list[AuditEntry] = []
    problems: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            problems.append(f"line {i}: not JSON ({exc.msg}); skipped")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {i}: not a JSON object; skipped")
            continue
        entries.append(_entry(i, obj))
    if problems:
        logger.warning("%s: %d line(s) could not be read (%s)", path, len(problems), problems[0])
    return path, entries, problems


def _summarise(run_id: str, entries: list[AuditEntry]) -> RunAudit:
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"messages": 0, "answered": 0, "refused": 0,
                                                              "errors": 0, "bytes_in": 0, "bytes_out": 0})
    keys: dict[str, set[str]] = defaultdict(set)
    rules: dict[str, int] = defaultdict(int)
    for e in entries:
        t = by_type[e.message_type]
        t["messages"] += 1
        t[{"answered": "answered", "refused": "refused", "error": "errors"}[e.outcome]] += 1
        t["bytes_in"] += e.bytes_in
        t["bytes_out"] += e.bytes_out
        for name, k in e.sent.items():
            if isinstance(k, list):
                keys[name].update(str(x) for x in k)
            else:
                keys[name].add(str(k))
        if e.refused:
            rules[e.policy_rule or e.refusal or "(no rule named)"] += 1
    times = sorted(e.time for e in entries if e.time)
    return RunAudit(
        run_id=run_id,
        first=times[0] if times else None,
        last=times[-1] if times else None,
        messages=len(entries),
        answered=sum(1 for e in entries if e.outcome == "answered"),
        refused=sum(1 for e in entries if e.refused),
        errors=sum(1 for e in entries if e.outcome == "error"),
        bytes_in=sum(e.bytes_in for e in entries),
        bytes_out=sum(e.bytes_out for e in entries),
        by_type={k: dict(v) for k, v in sorted(by_type.items())},
        keys_left={k: sorted(v) for k, v in sorted(keys.items())},
        rules=dict(sorted(rules.items())),
        entries=entries,
    )


def build_report(cache: Path | str, run: str | None = None) -> AuditReport:
    """Group the log by run and total it.

    Parameters
    ----------
    cache : Path or str
        The site's cache folder, or the log file.
    run : str, optional
        Only this run (its ``run_id``). Entries written before run ids were logged are grouped
        under ``'(run not recorded)'``.

    Returns
    -------
    AuditReport

    Raises
    ------
    AuditError
        No log, or ``run`` is not in it (the message lists the runs that are).
    """
    path, entries, problems = read_audit(cache)
    groups: dict[str, list[AuditEntry]] = defaultdict(list)
    for e in entries:
        groups[e.run_id or UNKNOWN_RUN].append(e)
    if run is not None:
        if run not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise AuditError(f"run {run!r} is not in {path}; runs there: {known}")
        groups = {run: groups[run]}
    runs = [_summarise(rid, es) for rid, es in groups.items()]
    runs.sort(key=lambda r: (r.first or "", r.run_id))
    return AuditReport(path, runs, problems, datetime.now(UTC).isoformat(timespec="seconds"))


def report_to_dict(report: AuditReport) -> dict[str, Any]:
    """The report as JSON-ready data (every entry, with the fields the log had)."""
    return {
        "path": str(report.path),
        "generated_at": report.generated_at,
        "problems": report.problems,
        "runs": [{**{k: v for k, v in asdict(r).items() if k != "entries"},
                  "entries": [{**{k: v for k, v in asdict(e).items() if k != "extra"}, **e.extra,
                               "outcome": e.outcome} for e in r.entries]}
                 for r in report.runs],
    }


def _fmt_bytes(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"  # pragma: no cover


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;max-width:1200px;margin:2em auto;
padding:0 1em}h1{font-size:22px}h2{font-size:18px;margin-top:2em;border-bottom:2px solid #18324f}
table{border-collapse:collapse;width:100%;margin:.6em 0}th,td{border-bottom:1px solid #d9dee3;padding:.3em .5em;
text-align:left;vertical-align:top}th{background:#eef1f4}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.refused td{background:#fff4e0}.error td{background:#fdecea}.note{color:#5d6b78}.box{background:#f3f6f9;
border:1px solid #d9dee3;border-radius:6px;padding:.6em 1em}code{font-size:12px}ul.left{margin:0;padding-left:1.1em}
"""


def render_html(report: AuditReport) -> str:
    """The report as one self-contained HTML page (inline CSS, no scripts, no external references)."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>What left this site - {e(str(report.path))}</title><style>{_CSS}</style></head><body>",
        "<h1>What left this site: messages from the federation server and this site's answers</h1>",
        "<div class='box'><p>This page lists every message the consortium's server sent to this hospital's node, as "
        "recorded by the node itself in its audit log, and what the node sent back. Each reply can only carry "
        "what the site's software lets out: model weights, aggregate statistics (counts, sums, histograms with a "
        "minimum cell count) and the site's name. Images, masks, patient rows and patient identifiers are never "
        "sent, so they never appear here.</p>"
        "<p><b>Columns.</b> <i>Bytes in</i>: size of the server's message. <i>Bytes out</i>: size of the reply. "
        "<i>What left</i>: the named records of the reply and, for each, the names of the values it held "
        "(weights are counted as arrays). <i>Outcome</i>: answered; refused by the site's policy (with the rule); "
        "or an error (the reply then carried only the error text).</p>",
        f"<p class='note'>Log: <code>{e(str(report.path))}</code> · page written {e(report.generated_at)}</p></div>",
    ]
    if report.problems:
        parts.append("<h2>Lines that could not be read</h2><ul>")
        parts += [f"<li>{e(p)}</li>" for p in report.problems]
        parts.append("</ul>")
    if not report.runs:
        parts.append("<p>The log holds no message.</p>")
    for r in report.runs:
        parts.append(f"<h2>Run {e(r.run_id)}</h2>")
        parts.append("<table><tr><th>first message</th><th>last message</th><th class='num'>messages</th>"
                     "<th class='num'>answered</th><th class='num'>refused</th><th class='num'>errors</th>"
                     "<th class='num'>bytes in</th><th class='num'>bytes out</th></tr>"
                     f"<tr><td>{e(r.first or '-')}</td><td>{e(r.last or '-')}</td><td class='num'>{r.messages}</td>"
                     f"<td class='num'>{r.answered}</td><td class='num'>{r.refused}</td><td class='num'>{r.errors}</td>"
                     f"<td class='num'>{_fmt_bytes(r.bytes_in)}</td><td class='num'>{_fmt_bytes(r.bytes_out)}</td>"
                     "</tr></table>")
        parts.append("<h3>Per message type</h3><table><tr><th>message type</th><th>what it is</th>"
                     "<th class='num'>messages</th><th class='num'>refused</th><th class='num'>errors</th>"
                     "<th class='num'>bytes in</th><th class='num'>bytes out</th></tr>")
        for t, v in r.by_type.items():
            parts.append(f"<tr><td><code>{e(t)}</code></td><td>{e(STAGE_NAMES.get(t, ''))}</td>"
                         f"<td class='num'>{v['messages']}</td><td class='num'>{v['refused']}</td>"
                         f"<td class='num'>{v['errors']}</td><td class='num'>{_fmt_bytes(v['bytes_in'])}</td>"
                         f"<td class='num'>{_fmt_bytes(v['bytes_out'])}</td></tr>")
        parts.append("</table><h3>Everything that left in this run (record: value names)</h3><ul>")
        parts += [f"<li><b>{e(k)}</b>: {e(', '.join(v))}</li>" for k, v in r.keys_left.items()] or [
            "<li>nothing</li>"]
        parts.append("</ul>")
        if r.rules:
            parts.append("<h3>Refusals by policy rule</h3><ul>")
            parts += [f"<li><code>{e(k)}</code>: {n}</li>" for k, n in r.rules.items()]
            parts.append("</ul>")
        parts.append("<h3>Every message</h3><table><tr><th>time (UTC)</th><th>message type</th><th class='num'>round"
                     "</th><th class='num'>bytes in</th><th class='num'>bytes out</th><th>what left</th>"
                     "<th>outcome</th></tr>")
        for x in r.entries:
            outcome = ("refused" + (f" by rule <code>{e(x.policy_rule)}</code>" if x.policy_rule else "")
                       + (f": {e(x.refusal)}" if x.refusal else "") if x.refused else
                       f"error: {e(x.error)}" if x.error else "answered")
            left = "".join(f"<li>{e(s)}</li>" for s in x.what_left()) or "<li>nothing</li>"
            parts.append(f"<tr class='{x.outcome}'><td>{e(x.time or '-')}</td><td><code>{e(x.message_type)}</code></td>"
                         f"<td class='num'>{x.server_round if x.server_round is not None else '-'}</td>"
                         f"<td class='num'>{_fmt_bytes(x.bytes_in)}</td><td class='num'>{_fmt_bytes(x.bytes_out)}</td>"
                         f"<td><ul class='left'>{left}</ul></td><td>{outcome}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _print(report: AuditReport) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    for p in report.problems:
        out.print(f"[yellow]warning[/] {report.path}: {p}")
    if not report.runs:
        out.print(f"{report.path}: no message recorded")
    for r in report.runs:
        table = Table(title=f"run {r.run_id}: {r.messages} message(s), {r.answered} answered, {r.refused} refused, "
                            f"{r.errors} error(s); in {_fmt_bytes(r.bytes_in)}, out {_fmt_bytes(r.bytes_out)}",
                      title_justify="left")
        for col, just in (("time (UTC)", "left"), ("message type", "left"), ("round", "right"),
                          ("bytes in", "right"), ("bytes out", "right"), ("what left", "left"),
                          ("outcome", "left")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for x in r.entries:
            outcome = (f"refused ({x.policy_rule or x.refusal or 'no rule named'})" if x.refused else
                       f"error: {x.error}" if x.error else "answered")
            table.add_row(x.time or "-", x.message_type, "-" if x.server_round is None else str(x.server_round),
                          _fmt_bytes(x.bytes_in), _fmt_bytes(x.bytes_out), "\n".join(x.what_left()) or "nothing",
                          outcome, style="yellow" if x.refused else "red" if x.error else None)
        out.print(table)
        for name, keys in r.keys_left.items():
            out.print(f"  left in [bold]{name}[/]: {', '.join(keys)}", highlight=False)


def audit(
    cache: Annotated[Path, typer.Option("--cache", help="The site's cache folder (node-config cache-dir), or the "
                                                        "audit.jsonl file itself.")],
    run: Annotated[str | None, typer.Option("--run", help="Only this run id.")] = None,
    html_file: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML page here "
                                                                  "(for a data-protection officer).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")] = (
        False),
) -> None:
    """Show every message this site received and answered: time, stage, bytes, what left, refusals."""
    try:
        report = build_report(cache, run)
    except AuditError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if html_file is not None:
        html_file.parent.mkdir(parents=True, exist_ok=True)
        html_file.write_text(render_html(report), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(report_to_dict(report), indent=2, sort_keys=True))
    else:
        _print(report)
        if html_file is not None:
            typer.echo(f"wrote {html_file}")
