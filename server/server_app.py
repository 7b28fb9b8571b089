"""Flower ServerApp: reads the run config, then hands the Grid to :func:`server.pipeline.run_pipeline`.

Run-config keys (kebab-case, ``flwr run . --run-config "key=value ..."``):

``config-path``  YAML config (default ``configs/demo.yaml``), resolved against the working directory.
``run-dir``      run directory to write (default ``<runs_root>/<timestamp>-<name>``); with ``resume=true``
                 an existing run directory to continue.
``resume``       continue the run in ``run-dir`` from its last completed round.
``simulation``   true on the simulation engine: virtual nodes map to the cohort's sites by partition-id.
``expected-sites`` deployment: how many sites to wait for (``federation.join_timeout_s``) before starting;
                 ``rectalfl run`` sets it to the number of registered site keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.pipeline import new_run_dir, run_pipeline, simulation_sites
    from shared.config import load_config

    rc = dict(context.run_config)
    cfg = load_config(str(rc.get("config-path", "configs/demo.yaml")))
    resume = bool(rc.get("resume", False))
    run_dir = Path(str(rc["run-dir"])) if rc.get("run-dir") else new_run_dir(cfg)
    simulation = bool(rc.get("simulation", True))
    sim_sites, external = simulation_sites(cfg) if simulation else (None, set(cfg.federation.external_sites))
    expected = int(rc.get("expected-sites", 0)) or None
    run_pipeline(grid, cfg, run_dir, engine="simulation" if simulation else "deployment", sim_sites=sim_sites,
                 external_sites=external, resume=resume, expected_sites=expected)
