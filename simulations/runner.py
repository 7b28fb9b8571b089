"""``rectalfl simulate``: a whole consortium on one machine (simulation only: it runs both sides).

1. creates (or reuses) the synthetic cohort and preprocesses every site into its own cache, as
   each hospital would on its own box;
2. ``federation.mode: federated`` runs a real Flower federation on the simulation engine: one
   virtual SuperNode per site running ``client.client_app:app`` and the pipeline's ServerApp;
   ``pooled`` (all training sites' cases in one place; a simulation-only reference) and ``local``
   (each site alone) run the same training, signature, evaluation and fusion-analysis code
   in-process, so the federated-vs-pooled-vs-local comparison is one config switch, Table 3 included.

Every mode checkpoints (federated: every round; pooled/local: every epoch) and continues with
``resume=True`` from the last completed round or epoch. SIGINT (Ctrl-C) and SIGTERM stop a run at a
safe point: the run record marks the stage and the run ``interrupted`` and the error
(:class:`shared.interrupt.Interrupted`) carries the run directory to continue.

Flower's simulation engine
--------------------------
The federated mode runs the ServerApp and ClientApps in this process with
``flwr.simulation.run_simulation`` (Ray backend). Flower 1.41 marks that function deprecated in
favour of ``flwr run`` against a SuperLink; rectalfl keeps it because it runs the consortium in one
process the command controls (no background SuperLink, run directory, Ctrl-C and return value in
hand), pins ``flwr>=1.41,<1.42`` in ``pyproject.toml`` so the function cannot vanish underneath,
and silences that one deprecation notice. ``flwr run`` remains available for the same apps (README
"With flwr run"). Flower telemetry, update checks and runtime installs are switched off in this
process and therefore in the Ray workers it starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _key, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
    os.environ[_key] = _value  # before Flower is imported: it reads them once

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from shared.config import RectalFLConfig  # noqa: E402
from shared.interrupt import Interrupted, handle_signals, signal_name  # noqa: E402

logger = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""After a stop signal, how long the ServerApp thread gets to reach a safe point before it is interrupted."""
STOP_LIMIT_S = 8.0
"""After a stop signal, how long the simulation engine gets to shut down before its wait is cut short."""


def prepare_sites(cfg: RectalFLConfig, *, workers: int | None = None, progress: Any = None) -> list[dict]:
    """Generate/reuse the cohort and preprocess each site (resumable; cheap when already done)."""
    from client.preprocess import preprocess_site
    from server.pipeline import simulation_sites
    from simulations.synth import generate_cohort

    generate_cohort(cfg.synth, Path(cfg.data_root), seed=cfg.seed, workers=workers or cfg.preprocess.workers,
                    progress=progress)
    sites, _ = simulation_sites(cfg)
    for s in sites:
        preprocess_site(Path(s["data_dir"]), Path(s["cache_dir"]), cfg, workers=workers, progress=progress)
    return sites


def resolve_run_dir(cfg: RectalFLConfig, run_dir: Path | None, *, resume: bool) -> tuple[RectalFLConfig, Path]:
    """Check the run directory before any work starts; returns the config to run and the directory.

    A resumed run uses its own saved ``config.yaml``; a new run refuses a directory that is not empty.

    Raises
    ------
    FileNotFoundError
        ``resume`` and the directory does not exist or holds no run.
    FileExistsError
        Not ``resume`` and the directory exists with files in it.
    shared.config.ConfigError
        The saved config of a resumed run is not valid (any more).
    """
    from server.pipeline import new_run_dir
    from shared.config import load_config

    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run directory to continue")
        run_dir = Path(run_dir)
        if not run_dir.exists():
            raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist (give the directory "
                                    "printed when the run started or stopped)")
        if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: {run_dir} is not a run directory (no config.yaml in it)")
        return load_config(run_dir / "config.yaml"), run_dir.resolve()
    if run_dir is not None:
        run_dir = Path(run_dir)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise FileExistsError(f"run directory {run_dir} already exists and is not empty; continue it with "
                                  f"`rectalfl simulate --resume {run_dir}` or choose another --run-dir")
        return cfg, run_dir.resolve()
    return cfg, new_run_dir(cfg).resolve()


def run_simulation(cfg: RectalFLConfig, *, run_dir: Path | None = None, resume: bool = False,
                   console: Any = None, workers: int | None = None, prepare: bool = True,
                   on_run_dir: Callable[[Path], None] | None = None) -> Path:
    """Run the configured mode on the simulated consortium; returns the run directory.

    Parameters
    ----------
    cfg : RectalFLConfig
        Ignored when resuming (the run's own saved config is used).
    run_dir : Path, optional
        Default ``<runs_root>/<timestamp>-<name>``; must be empty or absent unless ``resume``.
    resume : bool
        Continue ``run_dir`` from its last completed round (federated) or epoch (pooled/local).
    console : rich.console.Console, optional
        Where the end-of-run summary goes.
    prepare : bool
        Generate/reuse the cohort and preprocess every site first.
    on_run_dir : callable, optional
        Called with the run directory once it is known, before any work.

    Raises
    ------
    shared.interrupt.Interrupted
        SIGINT/SIGTERM stopped the run; ``.run_dir`` is set once the run directory exists.
    """
    from server.pipeline import simulation_sites

    cfg, run_dir = resolve_run_dir(cfg, run_dir, resume=resume)
    if on_run_dir is not None:
        on_run_dir(run_dir)
    if prepare:
        prepare_sites(cfg, workers=workers)
    sites, external = simulation_sites(cfg)
    from simulations.sites import prepare_site_policies

    prepare_site_policies(cfg, sites, external)  # each simulated hospital's own policy, key and roster
    t0 = time.perf_counter()
    try:
        if cfg.federation.mode == "federated":
            _run_flower_simulation(cfg, run_dir, sites, external, resume=resume)
        else:
            run_baseline(cfg, run_dir, sites, external, resume=resume)
    except Interrupted as exc:
        if (run_dir / "config.yaml").is_file():
            exc.run_dir = run_dir
        raise
    seconds = time.perf_counter() - t0
    logger.info("%s run finished in %.1f s: %s", cfg.federation.mode, seconds, run_dir)
    if console is not None:
        from server.summary import print_summary

        print_summary(run_dir, console, seconds)
    return run_dir


# --------------------------------------------------------------------------- federated (Flower simulation engine)


class _StopRequest:
    """A stop signal that threads waiting on the Flower grid check at every step."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.name = "SIGINT"
        self.at = 0.0

    def request(self, name: str) -> None:
        self.name, self.at = name, time.monotonic()
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted(self.name)


class _InterruptibleGrid:
    """The ServerApp's Grid, which raises :class:`Interrupted` at the next step once a stop is requested.

    ``send_and_receive`` is Flower's own (push, then pull until every reply is in or the timeout),
    with the stop request checked at every pull, so a round waiting an hour for sites stops at once.
    """

    def __init__(self, grid: Any, stop: _StopRequest) -> None:
        self._grid = grid
        self._stop = stop

    def get_node_ids(self) -> Any:
        self._stop.check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        self._stop.check()
        pending = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        interval = float(getattr(self._grid, "pull_interval", 0.1))
        replies: list[Any] = []
        while timeout is None or time.time() < end:
            self._stop.check()
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            self._stop.event.wait(interval)
        self._stop.check()
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _mute_libraries() -> None:
    """After a stop signal: no more Flower/Ray log lines (actors torn down mid-task log tracebacks, the
    driver's "(raylet) node marked dead" once a terminal's Ctrl-C has also stopped Ray's agents)."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("flwr", "ray"):
            logging.getLogger(name).disabled = True
    try:
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = lambda *a, **k: None
    except (ImportError, AttributeError):  # pragma: no cover - another Ray
        pass


class _NativeStderr:
    """Route the native (C++) writes to file descriptor 2 away while Ray shuts down after a stop signal
    (Ray's core worker reports the actors it lost there), keeping Python's own ``sys.stderr`` visible."""

    def __init__(self) -> None:
        self.saved_fd: int | None = None
        self.saved_stream: Any = None

    def silence(self) -> None:
        if self.saved_fd is not None:
            return
        try:
            sys.stderr.flush()
            self.saved_fd = os.dup(2)
            self.saved_stream = sys.stderr
            sys.stderr = os.fdopen(os.dup(self.saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except OSError:  # pragma: no cover - no stderr to redirect
            self.saved_fd = None

    def restore(self) -> None:
        if self.saved_fd is None:
            return
        try:
            sys.stderr.flush()
            os.dup2(self.saved_fd, 2)
            os.close(self.saved_fd)
            stream, sys.stderr = sys.stderr, self.saved_stream
            stream.close()
        except OSError:  # pragma: no cover
            pass
        self.saved_fd = None


def _start_ray(init_args: dict[str, Any]) -> None:
    """``ray.init`` as Flower's Ray backend would do it (which then reuses it), but from here, so that
    the caller can take SIGINT/SIGTERM back afterwards (``ray.init`` installs its own SIGTERM exit)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in (1, 2):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions on start-up failures
            try:  # what did start must not outlive this process
                ray.shutdown()
            except Exception:  # noqa: BLE001
                logger.debug("ray.shutdown after a failed start", exc_info=True)
            for pid in _descendants(os.getpid()):
                if _is_ray(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            if attempt == 2:
                raise RuntimeError(f"Flower's simulation engine (Ray) did not start: {exc} (an overloaded machine is "
                                   "the usual cause: Ray gives its node 30 s; run the same command again)") from None
            logger.warning("Ray did not start (%s); trying once more", exc)


class _DeprecatedRunSimulation(logging.Filter):
    """Drop Flower's notice that ``run_simulation`` is deprecated (see the module docstring: pinned and kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop_ray_workers() -> int:
    """Kill this process's Ray worker processes (``ray::...``: the ClientApp actors, busy or idle).

    Once the run record is safe, a stop must not wait for a local training round to finish in an
    actor; Flower then shuts Ray down as usual (the node processes stop with ``ray.shutdown``).
    """
    n = 0
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                os.kill(pid, signal.SIGKILL)
                n += 1
        except OSError:
            continue
    return n


def _stop_ray() -> None:
    """``ray.shutdown``, then no Ray process of this one outlives the run (a loaded machine can leave
    a worker behind for a while)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort: the run itself is over
        logger.debug("ray.shutdown failed", exc_info=True)
    end = time.monotonic() + 2.0
    while True:
        left = [pid for pid in _descendants(os.getpid()) if _is_ray(pid)]
        if not left or time.monotonic() > end:
            break
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _is_ray(pid: int) -> bool:
    try:
        return b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _async_raise(thread_id: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in another thread at its next Python instruction (CPython)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))


def _interrupted_class(name: str) -> type[Interrupted]:
    def __init__(self: Interrupted) -> None:
        Interrupted.__init__(self, name)

    return type("Interrupted", (Interrupted,), {"__init__": __init__})


def _run_flower_simulation(cfg: RectalFLConfig, run_dir: Path, sites: list[dict], external: set[str], *,
                           resume: bool) -> None:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.client_app import app as client_app
    from server.pipeline import run_pipeline
    from simulations.reference import reference_factory

    failure: dict[str, BaseException] = {}
    stop = _StopRequest()
    native = _NativeStderr()
    server_done, sim_done = threading.Event(), threading.Event()
    server_thread: dict[str, int] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        server_thread["id"] = threading.get_ident()
        try:
            run_pipeline(_InterruptibleGrid(grid, stop), cfg, run_dir, engine="simulation", sim_sites=sites,
                         external_sites=external, resume=resume, reference=reference_factory(sites))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread after Flower shut down
            failure["error"] = exc
        finally:
            server_done.set()

    def watchdog() -> None:
        """Bound the time from the signal to the exit, whatever Flower and Ray are doing."""
        if not server_done.wait(STOP_GRACE_S) and "id" in server_thread:
            _async_raise(server_thread["id"], _interrupted_class(stop.name))  # e.g. busy drawing the report
            server_done.wait(STOP_GRACE_S)
        if sim_done.wait(0.5):
            return
        logger.debug("stopped %d Ray worker(s)", _stop_ray_workers())
        if sim_done.wait(max(0.0, STOP_LIMIT_S - (time.monotonic() - stop.at))):
            return
        os.kill(os.getpid(), signal.SIGUSR1)  # cut the main thread's wait for Ray workers short
        if sim_done.wait(3.0):
            return
        sys.stderr.write(f"\ninterrupted by {stop.name}; the simulation engine did not stop in time. The run record "
                         f"in {run_dir} keeps what finished; continue with: rectalfl simulate --resume {run_dir}\n")
        sys.stderr.flush()
        os._exit(143 if stop.name == "SIGTERM" else 130)

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.event.is_set():  # a second Ctrl-C: stop now
            sys.stderr.write(f"\nstopped by a second {signal_name(signum)}; continue with: "
                             f"rectalfl simulate --resume {run_dir}\n")
            sys.stderr.flush()
            os._exit(130)
        stop.request(signal_name(signum))
        native.silence()
        _mute_libraries()
        threading.Thread(target=watchdog, name="rectalfl-stop", daemon=True).start()

    def on_kick(_signum: int, _frame: Any) -> None:
        raise Interrupted(stop.name)

    n_cpus = max(1, os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": n_cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                      "log_to_driver": False},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no FutureWarning tip from Ray on CPU
    flwr_logger = logging.getLogger("flwr")
    quiet = _DeprecatedRunSimulation()
    flwr_logger.addFilter(quiet)
    try:
        with handle_signals(on_signal), handle_signals(on_kick, (signal.SIGUSR1,)):
            _start_ray(backend_config["init_args"])
            for s in (signal.SIGINT, signal.SIGTERM):  # ray.init replaced the SIGTERM handler: ours again
                signal.signal(s, on_signal)
            flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites),
                                backend_config=backend_config)
    except Interrupted:
        # the main thread's wait was cut short: the ServerApp thread has recorded the interruption
        server_done.wait(STOP_GRACE_S)
        raise Interrupted(stop.name) from None
    finally:
        sim_done.set()
        flwr_logger.removeFilter(quiet)
        _stop_ray()
        native.restore()
    if "error" in failure:
        raise failure["error"]
    if stop.event.is_set() and not (run_dir / "run.db").is_file():
        raise Interrupted(stop.name)
    if not (run_dir / "run.db").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'run.db'}; see the log above")


# --------------------------------------------------------------------------- in-process baselines


def _group_data(algos: dict[str, Any], members: list[str], key: str) -> Any:
    from client.train import SliceSet

    parts = [algos[m].data[key].subset(["train"]) for m in members]
    return SliceSet(key, np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                    sum((p.patient_ids for p in parts), []), np.concatenate([p.split for p in parts]))


def _train_group(cfg: RectalFLConfig, store: Any, run_id: str, run_dir: Path, model_name: str, members: list[str],
                 algos: dict[str, Any]) -> dict[str, OrderedDict]:
    """Train every backbone of one baseline model epoch by epoch, checkpointing after each epoch.

    Epoch ``e`` of backbone ``k`` is seeded from (training seed, model, k, e) and starts a fresh SGD
    optimiser from the previous epoch's weights, so continuing from a checkpoint gives the same
    weights as never stopping.
    """
    from client.algorithm import baseline_privacy
    from client.train import train_backbone
    from shared.models import initial_states, models_from_states, stable_seed, training_seed
    from shared.records import flatten_states, unflatten_states

    stage = f"train:{model_name}"
    total = cfg.federation.rounds * cfg.train.local_epochs
    ckdir = run_dir / "checkpoints" / model_name
    like = initial_states(cfg)
    states = like
    start = store.last_completed_round(run_id, stage)
    if start > total:
        start = total
    if start:
        with np.load(ckdir / f"epoch_{start:04d}.npz") as z:
            states = unflatten_states({k: z[k] for k in z.files}, like)
        logger.info("%s: continuing after epoch %d of %d", model_name, start, total)
    models = models_from_states(cfg, states)
    keys = algos[members[0]].keys
    data = {key: _group_data(algos, members, key) for key in keys} if start < total else {}
    who = "+".join(members)
    privacy = baseline_privacy(cfg, [algos[m] for m in members], model_name)  # DP: None when off
    dps = {key: privacy.dp(key, len(data[key])) for key in data} if privacy is not None else {}
    for dp in dps.values():  # DP: a resumed baseline's accountant first takes the epochs already trained
        for _ in range(start * (dp.steps_per_epoch if dp is not None else 0)):
            dp.accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    with store.stage(run_id, stage) as detail:
        detail.update(members=members, epochs=total, start_epoch=start)
        for epoch in range(start + 1, total + 1):
            t0 = time.perf_counter()
            store.start_round(run_id, stage, epoch, n_sent=len(members))
            metrics: dict[str, float] = {}
            for key in keys:
                stats = train_backbone(models[key], data[key], cfg.train, epochs=1,
                                       seed=stable_seed(training_seed(cfg), model_name, key, epoch),
                                       dp=dps.get(key))
                metrics[f"{key}/train-loss"] = stats.loss_last_epoch
                metrics[f"{key}/n"] = float(stats.n_examples)
            final = {k: OrderedDict(m.state_dict()) for k, m in models.items()}
            ckdir.mkdir(parents=True, exist_ok=True)
            path = ckdir / f"epoch_{epoch:04d}.npz"
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **flatten_states(final))
            tmp.replace(path)
            store.add_artefact(run_id, "checkpoint", path, run_dir, meta={"model": model_name, "epoch": epoch})
            store.log_metrics(run_id, stage, who, metrics, round=epoch, split="train")
            losses = [v for k, v in metrics.items() if k.endswith("/train-loss") and np.isfinite(v)]
            store.finish_round(run_id, stage, epoch, n_replied=len(members), n_failed=0,
                               train_loss=float(np.mean(losses)) if losses else None,
                               seconds=time.perf_counter() - t0)
            logger.info("%s epoch %d/%d: mean train loss %.4f, %.1f s", model_name, epoch, total,
                        float(np.mean(losses)) if losses else float("nan"), time.perf_counter() - t0)
        if privacy is not None:  # DP: the baseline's epsilon, in the run record like a site's
            store.log_metrics(run_id, stage, who, privacy.finish())
    return {k: OrderedDict(m.state_dict()) for k, m in models.items()}


def _inprocess_fusion(cfg: RectalFLConfig, algos: dict[str, Any], names: list[str], run: str) -> Callable:
    """Send fitted fusion models to simulated sites in this process, as ``evaluate.fusion`` does: each site
    scores its patients only with models it derived itself in ``run`` (else refused), keeps the scores."""
    from client.site_policy import load_rules
    from client.stats_service import PolicyRefusal
    from simulations.sites import site_service

    def send(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out = {}
        for n in names:
            algo = algos[n]
            rules = load_rules({}, algo.cache_dir, cfg)
            svc = site_service(n, algo.cache_dir, rules.policy, rules.clinical_columns, algo.site_table,
                               rules.identity_key)
            own = svc.derived_models(run)
            foreign = sorted(name for name, m in models.items() if m.digest() not in own)
            if foreign:
                raise PolicyRefusal("models", f"site {n}: model(s) {foreign} were not derived by this site in {run}")
            out[n] = algo.apply_fusion(models, run_id=run)
        return out

    return send


def _baseline_analysis(cfg: RectalFLConfig, store: Any, run_id: str, out_dir: Path, run_dir: Path,
                       algos: dict[str, Any], roles: dict[str, str], sites: list[dict], tag: str, run: str) -> None:
    """The fusion analysis of one baseline model: the same site-computed queries as a federated run, the
    simulated sites answering in this process (:func:`simulations.sites.inprocess_stats_runner`), then
    the fitted models scored on site."""
    from server.analysis import run_analysis
    from simulations.reference import pooled_reference
    from simulations.sites import inprocess_stats_runner

    with store.stage(run_id, f"analysis:{tag}"):
        members = [s for s in sites if s["name"] in roles]
        ref = pooled_reference(cfg, members, roles) if cfg.fusion.pooled_reference else None
        res = run_analysis(inprocess_stats_runner(cfg, members, run), _inprocess_fusion(cfg, algos, list(roles), run),
                           cfg, roles, out_dir, reference=ref)
        for name in res.tables:
            store.add_artefact(run_id, "table", out_dir / "tables" / f"{name}.csv", run_dir)
        if (out_dir / "models" / "fusion.npz").is_file():
            store.add_artefact(run_id, "model", out_dir / "models" / "fusion.npz", run_dir,
                               meta={"metadata": (out_dir / "models" / "fusion.json").relative_to(run_dir).as_posix()})
        perf = res.tables.get("table3_performance")
        for row in perf.itertuples() if perf is not None and "auc" in perf else []:
            if pd.notna(row.auc):
                split = {"training": "train", "internal_test": "test"}.get(row.cohort, row.cohort)
                store.log_metric(run_id, f"analysis:{tag}", f"cohort:{row.cohort}", f"{row.model}/auc",
                                 float(row.auc), split=split if split in ("train", "test", "external") else None,
                                 n=int(row.n_pos + row.n_neg))


def _merge_local_outputs(run_dir: Path, groups: list[str]) -> None:
    """Local mode: one Table 3 (and the other tables and curves) for all local models, model = ``<group>/<model>``."""
    import json

    tables: dict[str, list[pd.DataFrame]] = {}
    curves: dict[str, list[Any]] = {}
    for g in groups:
        for p in sorted((run_dir / g / "tables").glob("*.csv")):
            try:
                df = pd.read_csv(p)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                continue
            for col in ("model", "model_a", "model_b"):
                if col in df:
                    df[col] = df[col].map(lambda m, g=g: f"{g}/{m}")
            tables.setdefault(p.stem, []).append(df)
        cp = run_dir / g / "report_data" / "curves.json"
        if cp.is_file():
            data = json.loads(cp.read_text())
            for kind, items in data.items():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "model" in item:
                        item["model"] = f"{g}/{item['model']}"
                    if isinstance(item, dict) and isinstance(item.get("models"), dict):
                        item["models"] = {f"{g}/{m}": v for m, v in item["models"].items()}
                    if isinstance(item, dict) and "signature" in item:
                        item["signature"] = f"{g}/{item['signature']}"
                    curves.setdefault(kind, []).append(item)
    (run_dir / "tables").mkdir(parents=True, exist_ok=True)
    for name, parts in tables.items():
        if name != "signature_auc":
            pd.concat(parts, ignore_index=True).to_csv(run_dir / "tables" / f"{name}.csv", index=False)
    (run_dir / "report_data").mkdir(parents=True, exist_ok=True)
    (run_dir / "report_data" / "curves.json").write_text(json.dumps(curves))


def run_baseline(cfg: RectalFLConfig, run_dir: Path, sites: list[dict], external: set[str], *,
                 resume: bool = False) -> pd.DataFrame:
    """``pooled`` or ``local``: the same training, signature, evaluation and fusion code, no federation.

    ``pooled`` trains one model on all training sites' training patients; ``local`` one model per
    training site on its own patients. Each is checkpointed every epoch (``checkpoints/<model>/``)
    and recorded as stages ``train:<model>``, ``signatures:<model>``, ``evaluate:<model>`` and
    ``analysis:<model>``, whose rounds are the epochs. The fusion analysis answers through the same
    federated-statistics protocols as a federated run; ``pooled`` writes the tables and report of a
    federated run (``tables/``, ``report.html``); ``local`` writes each local model's tables in
    ``<run_dir>/local-<site>/`` and their union (model ``local-<site>/<fusion model>``), with the
    report, at the top.

    Parameters
    ----------
    resume : bool
        Continue the run in ``run_dir`` after its last completed epoch.
    """
    from client.algorithm import SiteAlgorithm
    from server.evaluation import evaluate_signatures
    from server.pipeline import mark_interrupted, prepare_run_dir, save_final_model, write_table
    from server.privacy_ledger import record_privacy
    from server.store import RunStore
    from shared.records import states_to_record
    from simulations.sites import inprocess_stats_runner

    run_dir = Path(run_dir).resolve()
    cfg = prepare_run_dir(cfg, run_dir, resume=resume)
    store = RunStore.open_run_dir(run_dir)
    known = store.runs()
    run_id = str(known["run_id"].iloc[0]) if resume and len(known) else run_dir.name
    mode = cfg.federation.mode
    try:
        store.start_run(run_id, cfg.name, cfg.to_yaml(), cfg.digest(), mode, "none", cfg.seed, "simulation")
        if resume:
            store.event(run_id, "resumed", "resumed: each baseline model continues after its last completed epoch")
        else:
            store.add_artefact(run_id, "config", run_dir / "config.yaml", run_dir)
        record_site_exclusions(store, run_id, sites)
        algos = {s["name"]: SiteAlgorithm(s["name"], Path(s["data_dir"]), Path(s["cache_dir"]), cfg) for s in sites}
        train_sites = [n for n in algos if n not in external]
        roles = {n: ("external" if n in external else "train") for n in algos}
        groups = {"pooled": train_sites} if mode == "pooled" else {f"local-{n}": [n] for n in train_sites}
        tables = []
        t0 = time.perf_counter()
        for model_name, members in groups.items():
            final = _train_group(cfg, store, run_id, run_dir, model_name, members, algos)
            if mode == "pooled":
                save_final_model(cfg, run_dir, states_to_record(final), store, run_id,
                                 seconds=time.perf_counter() - t0)
            stats_run = f"{run_id}-{model_name}"  # each baseline model's signatures are their own data
            with store.stage(run_id, f"signatures:{model_name}"):
                for name, algo in algos.items():
                    algo.signatures(final, external=name in external, run_id=stats_run)
            with store.stage(run_id, f"evaluate:{model_name}"):
                # The same site-computed statistics as the federation, with the simulated sites in this process.
                t = evaluate_signatures(inprocess_stats_runner(cfg, sites, stats_run), cfg, roles)
            t.insert(0, "model", model_name)
            tables.append(t)
            if cfg.fusion.enabled:
                if mode == "pooled":
                    _baseline_analysis(cfg, store, run_id, run_dir, run_dir, algos, roles, sites, model_name,
                                       stats_run)
                else:  # each site alone: its model's fusion fitted on its own patients, checked on the external sites
                    own = {n: r for n, r in roles.items() if n in members or r == "external"}
                    _baseline_analysis(cfg, store, run_id, run_dir / model_name, run_dir, algos, own, sites,
                                       model_name, stats_run)
        table = pd.concat(tables, ignore_index=True)
        write_table(table, run_dir / "tables" / "signature_auc.csv", store, run_id, run_dir)
        if cfg.fusion.enabled:
            _write_reports(store, run_id, run_dir, list(groups) if mode == "local" else [])
        record_privacy(cfg, run_dir, store, run_id)  # DP: tables/privacy_ledger.csv
        store.finish_run(run_id, "completed")
        return table
    except KeyboardInterrupt as exc:
        mark_interrupted(store, run_id, run_dir, exc)
        raise
    except Exception as exc:
        store.event(run_id, "run_failed", f"{type(exc).__name__}: {exc}", level="error")
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        store.close()


def _write_reports(store: Any, run_id: str, run_dir: Path, local_groups: list[str]) -> None:
    """The run's report (``local``: of the union of the local models' tables, :func:`_merge_local_outputs`)."""
    from server.report import ReportError, build_report

    with store.stage(run_id, "report") as detail:
        if local_groups:
            _merge_local_outputs(run_dir, local_groups)
        try:
            path = build_report(run_dir, status="completed")  # the last stage: the run ends right after it
        except ReportError as exc:  # e.g. no fusion model could be fitted on so few patients
            detail["skipped"] = str(exc)
            store.event(run_id, "report_skipped", str(exc), level="warning")
            logger.warning("no report: %s", exc)
            return
        store.add_artefact(run_id, "report", path, run_dir)
        logger.info("report: %s", path)


def record_site_exclusions(store: Any, run_id: str, sites: list[dict]) -> None:
    """Simulation only: put each simulated site's exclusion counts (rule, code) in the run record.

    Counts per site, rule and reason, read from the site's cache (``exclusions.csv``); no patient id.
    """
    from client.preprocess import exclusion_summary

    for s in sites:
        summary = exclusion_summary(Path(s["cache_dir"]))
        if summary is None or not summary["patients"] and not summary["volumes"]:
            continue
        store.event(run_id, "exclusions",
                    f"{s['name']}: {summary['patients']} patient(s) and {summary['volumes']} volume(s) excluded "
                    f"by the {summary['rule']} rule ({', '.join(f'{k} {v}' for k, v in summary['by_code'].items())})",
                    level="warning", site=s["name"], detail=summary)
