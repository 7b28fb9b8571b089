"""Hospital commands: ``rectalfl site check | preprocess | join`` (run on the hospital's machine).

Everything here works on the site's own data and cache; nothing leaves the site except what the
Flower ClientApp answers once the site has joined a consortium (``site join``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shared.cli import ConfigOpt, JsonOpt, WorkersOpt, console, fail, load, out, progress_bar
from shared.interrupt import Interrupted

site_app = typer.Typer(help="Hospital side: check and preprocess a site's data (nothing leaves the site).",
                       no_args_is_help=True)


@site_app.command("check")
def site_check(
    site_dir: Annotated[Path, typer.Argument(help="The site folder (patients.csv, images/, masks/).")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    fast: Annotated[bool, typer.Option("--fast", help="Check headers and geometry only; skip pixel checks.")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="List every warning instead of grouping them.")] = False,
) -> None:
    """Check a site's data against the contract. Exit 0 when usable (warnings allowed), 1 otherwise."""
    from shared.cohort import CohortError, check_site

    cfg = load(config)
    with progress_bar(f"checking {site_dir.name}", not as_json) as cb:
        try:
            report = check_site(site_dir, cfg, progress=cb, read_pixels=not fast)
        except CohortError as exc:
            fail(str(exc))
    if as_json:
        out.print_json(json.dumps(report.to_dict(), default=str))
    else:
        print_report(report, show_all=show_all)
    raise typer.Exit(0 if report.ok else 1)


def print_report(report: Any, *, show_all: bool = False, limit: int = 15) -> None:
    """Errors first, one line each with what to do; warnings grouped by code unless ``show_all``."""
    errors = sorted(report.errors, key=lambda i: (i.patient_id or "", i.code))
    for i in errors[: None if show_all else limit]:
        out.print(f"[red]error[/] [bold]{i.code}[/] {i.message}\n      [dim]fix:[/] {i.fix}", highlight=False)
    if len(errors) > limit and not show_all:
        out.print(f"... {len(errors) - limit} more error(s): --all shows every one, --json for machines")
    warnings = report.warnings
    if show_all:
        for i in warnings:
            out.print(f"[yellow]warning[/] [bold]{i.code}[/] {i.message}\n      [dim]fix:[/] {i.fix}", highlight=False)
    elif warnings:
        table = Table(title=f"{len(warnings)} warning(s) by kind (--all lists each)", title_justify="left")
        for col in ("code", "count", "example"):
            table.add_column(col, overflow="fold")
        by_code: dict[str, list[Any]] = {}
        for w in warnings:
            by_code.setdefault(w.code, []).append(w)
        for code, items in sorted(by_code.items()):
            table.add_row(f"[yellow]{code}[/]", str(len(items)), items[0].message)
        out.print(table)
    verdict = "[green]usable[/]" if report.ok else "[red]NOT usable[/] (fix the errors above, or they exclude those cases)"
    out.print(
        f"{report.site_dir}: {report.n_patients} patients, {report.n_usable_patients} usable, "
        f"{report.volumes_checked} volumes checked -> {verdict}"
    )
    if report.exclusions:
        vols = {v for v in report.excluded_volumes if v[0] not in report.excluded_patients}
        out.print(f"exclusion rule [bold]{report.rule}[/] (check.exclusion): {len(report.excluded_patients)} "
                  f"patient(s) excluded entirely ({', '.join(sorted(report.excluded_patients)[:10])}"
                  f"{', ...' if len(report.excluded_patients) > 10 else ''})"
                  + (f", {len(vols)} more volume(s) on their own" if vols else "")
                  + "; preprocessing and training leave out the same (see docs/site.md)", highlight=False)


@site_app.command("preprocess")
def site_preprocess(
    site_dir: Annotated[Path, typer.Argument(help="The site folder.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Cache folder for the preprocessed slices (stays on site).")],
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    force: Annotated[bool, typer.Option(help="Recompute volumes already in the cache.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """N4, normalise, discretise, and extract each volume's largest-tumour slice into a resumable cache."""
    from client.preprocess import preprocess_site
    from shared.cohort import CohortError

    cfg = load(config)
    t0 = time.perf_counter()
    done = {"n": 0, "total": 0}
    try:
        with progress_bar(f"preprocessing {site_dir.name}", not as_json) as cb:
            def progress(n: int, total: int, label: str) -> None:
                done.update(n=n, total=total)
                cb(n, total, label)
            try:
                manifest = preprocess_site(site_dir, out_dir, cfg, workers=workers, progress=progress, force=force)
            except CohortError as exc:
                fail(str(exc))
    except KeyboardInterrupt as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        console.print(f"[yellow]interrupted[/] by {name}: {done['n']} of {done['total'] or '?'} volumes are finished "
                      f"and kept in {out_dir} (no manifest.csv until the site is complete)", highlight=False)
        console.print(f"continue with: [bold]{shlex.join(['rectalfl', *sys.argv[1:]])}[/]", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(143 if name == "SIGTERM" else 130) from None
    seconds = time.perf_counter() - t0
    counts = manifest["status"].value_counts().to_dict()
    if as_json:
        from client.preprocess import exclusion_summary

        out.print_json(json.dumps({"cache_dir": str(out_dir), "volumes": len(manifest), "status": counts,
                                   "seconds": round(seconds, 2), "exclusions": exclusion_summary(out_dir),
                                   "errors": manifest.loc[manifest["status"] == "error", ["patient_id", "timepoint",
                                                                                        "sequence", "error"]]
                                   .to_dict(orient="records")}, default=str))
    else:
        print_manifest_summary(manifest, out_dir, seconds)
    raise typer.Exit(0 if counts.get("ok", 0) > 0 else 1)


def print_manifest_summary(manifest: Any, out_dir: Path, seconds: float) -> None:
    statuses = ("ok", "no_mask", "error", "excluded")
    table = Table(title=f"preprocessed volumes in {out_dir} ({seconds:.1f} s)")
    table.add_column("timepoint")
    table.add_column("sequence")
    for status in statuses:
        table.add_column(status, justify="right")
    for (tp, seq), g in manifest.groupby(["timepoint", "sequence"], sort=True):
        vc = g["status"].value_counts()
        table.add_row(str(tp), str(seq), *(str(int(vc.get(s, 0))) for s in statuses))
    out.print(table)
    bad = manifest[manifest["status"] == "error"]
    for _, row in bad.head(20).iterrows():
        out.print(f"[red]error[/] {row['patient_id']} {row['timepoint']}/{row['sequence']}: {row['error']}")
    if len(bad) > 20:
        out.print(f"... and {len(bad) - 20} more errors: see {out_dir / 'manifest.csv'}")
    excl = manifest[manifest["status"] == "excluded"]
    if len(excl):
        by = excl.groupby("excluded_by")["patient_id"].nunique() if "excluded_by" in excl else {}
        out.print(f"[yellow]excluded[/] {len(excl)} volume(s) of {excl['patient_id'].nunique()} patient(s) by the "
                  "exclusion rule: " + "; ".join(f"{k} ({v} patient(s))" for k, v in list(by.items())[:8])
                  + f"; every decision in {out_dir / 'exclusions.csv'}", highlight=False)


@site_app.command("join")
def site_join(
    config: Annotated[Path, typer.Option("--config", "-c", help="Site config (data_root, cache_root, deploy, policy).")] =
    Path("configs/site.example.yaml"),
    server: Annotated[str | None, typer.Option("--server", help="SuperLink HOST:PORT (default deploy.superlink).")]
    = None,
    root_cert: Annotated[Path | None, typer.Option("--root-cert", help="The consortium's ca.crt.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="This site's site.key.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Site name (default deploy.site_name or the data "
                                                           "folder's name).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Site data folder (default data_root).")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Site cache folder (default cache_root).")] = None,
    node_port: Annotated[int | None, typer.Option("--node-port", help="Local (127.0.0.1) port of this SuperNode's "
                                                                     "runtime API, unique per SuperNode on one "
                                                                     "machine.")] = None,
    skip_check: Annotated[bool, typer.Option("--skip-check", help="Do not re-check the data.")] = False,
    print_app_hash: Annotated[bool, typer.Option("--print-app-hash", help="Print the hash of the Flower app bundle "
                                                                         "of the rectalfl installed here (what "
                                                                         "policy.allowed_apps lists) and exit.")]
    = False,
) -> None:
    """Check the site's data, preprocess if needed, then connect this hospital to the consortium.

    Runs flower-supernode (process isolation, runtime API on 127.0.0.1 with a secret) and the site's
    app gate, which runs ClientApp tasks only for the app bundles the site approved
    (policy.allowed_apps; by default the rectalfl installed here). SIGTERM or Ctrl-C leaves cleanly.
    """
    from client.join import allowed_apps, check_reachable, check_tls, gate_command, supernode_command
    from client.preprocess import preprocess_site
    from shared.cohort import CohortError, check_site
    from shared.flower import APP_DIR, DeployError, app_hash, private_dir

    if print_app_hash:
        try:
            out.print(app_hash(APP_DIR), highlight=False)
        except DeployError as exc:
            fail(str(exc))
        raise typer.Exit(0)
    overrides = {k: str(v) for k, v in {"data_root": data, "cache_root": cache}.items() if v is not None}
    if node_port is not None:
        overrides["deploy.node_port"] = str(node_port)
    cfg = load(config, overrides)
    d = cfg.deploy
    superlink = server or d.superlink
    ca, site_key = root_cert or d.root_certificates, key or d.site_key
    if ca is None or site_key is None:
        fail("need the consortium's ca.crt and this site's site.key: --root-cert and --key, or "
                  "deploy.root_certificates and deploy.site_key in the site config")
    if not Path(site_key).is_file():
        fail(f"site key {site_key} not found; the operator creates it with `rectalfl certs add-site NAME`")
    site_dir, cache_dir = Path(cfg.data_root), Path(cfg.cache_root)
    site = name or d.site_name or site_dir.resolve().name
    try:
        allowed, source = allowed_apps(list(cfg.policy.allowed_apps))
    except DeployError as exc:
        fail(str(exc))
    if not skip_check:
        with progress_bar(f"checking {site}") as cb:
            try:
                report = check_site(site_dir, cfg, progress=cb, read_pixels=False)
            except CohortError as exc:
                fail(str(exc))
        if not report.ok:
            print_report(report)
            fail(f"{site_dir} is not usable yet; fix the errors above (`rectalfl site check {site_dir}`)", 1)
        out.print(f"{site}: {report.n_usable_patients} usable patient(s)")
    with progress_bar(f"preprocessing {site} (only what is missing)") as cb:
        try:
            preprocess_site(site_dir, cache_dir, cfg, progress=cb)
        except CohortError as exc:
            fail(str(exc))
    try:
        check_reachable(superlink)
        check_tls(superlink, Path(ca))
    except DeployError as exc:
        fail(str(exc))
    home = private_dir(Path(d.site_flwr_home) if d.site_flwr_home else cache_dir / "flower")
    secret = home / "superexec.secret"
    cmd = supernode_command(superlink, Path(ca), Path(site_key), site=site, data_dir=site_dir, cache_dir=cache_dir,
                            secret_file=secret, device=None if cfg.train.device == "auto" else cfg.train.device,
                            node_port=d.node_port, site_config=config if Path(config).is_file() else None,
                            busy_poll_s=d.site_busy_poll_s)
    audit_log = cache_dir.resolve() / "audit.jsonl"
    out.print(f"joining {superlink} as {site} (data stays in {site_dir}; audit log {audit_log}). This site runs only "
              f"app bundle(s) {', '.join(h[:12] for h in allowed)} ({source}). Ctrl-C leaves the consortium.",
              highlight=False)
    run_supervised(cmd, Path(site_key), home=home, secret=secret, site=site,
                   gate=lambda pid: gate_command(d.node_port, secret, allowed, site=site, audit_log=audit_log,
                                                 parent_pid=pid, warm_start=d.site_warm_start),
                   threads=d.site_threads)


def thread_env(env: dict[str, str], threads: int | None) -> dict[str, str]:
    """The app gate's environment (its ClientApps inherit it) with ``deploy.site_threads`` applied: the
    OpenMP / BLAS thread counts PyTorch and NumPy read when they load. ``None``: unchanged."""
    if threads is None:
        return env
    n = str(int(threads))
    return {**env, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def run_supervised(cmd: list[str], site_key: Path, *, home: Path, secret: Path, site: str,
                   gate: Callable[[int], list[str]], retry_s: float = 10.0, max_quick_failures: int = 5,
                   threads: int | None = None) -> None:
    """Run flower-supernode and the app gate in the foreground and keep this site in the consortium.

    Flower's SuperNode stops when it loses its SuperLink (e.g. the server restarted); this restarts it
    (and its gate, with a fresh SuperExec secret) after ``retry_s`` seconds. A refused or unreadable
    key stops for good, with what to do; so do ``max_quick_failures`` consecutive exits before ever
    connecting. Ctrl-C or SIGTERM leaves: both processes are stopped, none is left behind (they also
    receive SIGTERM if this process is killed, see :func:`shared.flower.die_with_parent`).
    """
    from client.join import BAD_KEY, REFUSED, explain_supernode_exit
    from shared.flower import die_with_parent, flwr_env, new_secret

    def stop(*_: object) -> None:
        raise Interrupted("SIGTERM")

    signal.signal(signal.SIGTERM, stop)  # `kill` (or a service manager) leaves cleanly, SuperNode included
    env = flwr_env(home)
    rejoin = shlex.join(["rectalfl", *sys.argv[1:]])
    quick = 0
    while True:
        t0 = time.time()
        new_secret(secret)
        tail: list[str] = []
        state = {"connected": False}
        # own process groups: their helper processes (ClientApps) go with them
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=die_with_parent())
        gate_proc = subprocess.Popen(gate(proc.pid), env=thread_env(env, threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, preexec_fn=die_with_parent())

        def pump(stream: Any, keep: bool, tail: list[str] = tail, state: dict = state) -> None:
            for line in stream:
                sys.stdout.write(line)
                sys.stdout.flush()
                if keep:
                    state["connected"] = state["connected"] or "SuperNode ID" in line
                    tail.append(line)
                    del tail[:-60]

        readers = [threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
                   threading.Thread(target=pump, args=(gate_proc.stdout, False), daemon=True)]
        for r in readers:
            r.start()
        try:
            while proc.poll() is None and gate_proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt as exc:
            _stop_all([(proc, signal.SIGINT), (gate_proc, signal.SIGTERM)])
            name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
            console.print(f"[yellow]left the consortium[/] ({name}): the SuperNode and the app gate of {site} are "
                          f"stopped (a task in progress is not answered; the server goes on without this site or "
                          f"waits, as its min_sites says). The cache and audit log are kept. Rejoin with `{rejoin}`",
                          highlight=False)
            raise typer.Exit(0) from None
        if gate_proc.poll() is not None and proc.poll() is None:
            console.print(f"[yellow]the app gate stopped (exit {gate_proc.returncode}); restarting the SuperNode[/]")
        _stop_all([(gate_proc, signal.SIGTERM), (proc, signal.SIGTERM)])
        code = proc.returncode
        readers[0].join(timeout=3)
        connected = state["connected"]
        text = "".join(tail)
        if BAD_KEY.search(text) or REFUSED.search(text):
            fail(explain_supernode_exit(code, text, site_key, site), 1)
        quick = 0 if connected or time.time() - t0 > 60 else quick + 1
        if quick >= max_quick_failures:
            fail(explain_supernode_exit(code, text, site_key, site), 1)
        console.print(f"[yellow]the SuperNode stopped (exit {code}); reconnecting in {retry_s:.0f} s[/] "
                          "(Ctrl-C to leave)")
        try:
            time.sleep(retry_s)
        except KeyboardInterrupt as exc:
            name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
            console.print(f"[yellow]left the consortium[/] ({name}) while waiting to reconnect; rejoin with "
                          f"`{rejoin}`", highlight=False)
            raise typer.Exit(0) from None


def _stop_all(procs: list[tuple[subprocess.Popen, int]], timeout: float = 10.0) -> None:
    """Signal each process group, wait up to ``timeout`` s, then SIGKILL what is left."""
    for p, sig in procs:
        if p.poll() is None:
            _killpg(p, sig)
    deadline = time.time() + timeout
    for p, _ in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _killpg(p, signal.SIGKILL)
            p.wait(timeout=10)
    for p, _ in procs:  # helper processes left in the groups (ClientApps)
        _killpg(p, signal.SIGTERM)


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _register_site_views() -> None:
    """What a site looks at on its own machine: what left it (``audit``), what the networks see (``explain``)."""
    from client.audit import audit
    from client.explain import explain

    site_app.command("audit")(audit)
    site_app.command("explain")(explain)


_register_site_views()
