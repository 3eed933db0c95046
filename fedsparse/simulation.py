"""Run the ServerApp and ClientApp in Flower's simulation engine (Ray), locally or on a cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.simulation import run_simulation as flwr_run_simulation
from omegaconf import DictConfig

from fedsparse.client_app import make_client_app
from fedsparse.config import run_dir
from fedsparse.server_app import make_server_app


def backend_config(cfg: DictConfig) -> dict:
    """Ray settings: one actor per `client_cpus` cores, or attach to `federation.ray_address`."""
    fed = cfg.federation
    init_args = (
        {"address": str(fed.ray_address)}
        if fed.ray_address
        else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    )
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": 0.0}, "init_args": init_args}


def run_simulation(cfg: DictConfig, verbose: bool = False) -> Path:
    """Simulate `federation.num_clients` nodes; returns the run directory."""
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU-only: keep Ray quiet
    flwr_run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
        verbose_logging=verbose,
    )
    out = run_dir(cfg)
    if not (out / "summary.json").exists():
        raise RuntimeError(
            f"The simulation ended without writing {out / 'summary.json'}: "
            "see the Flower log above for the error (rerun with verbose logging)."
        )
    return out
