"""Run the ServerApp and ClientApp in Flower's simulation engine (Ray), locally or on a cluster."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from flwr.simulation import run_simulation as flwr_run_simulation
from omegaconf import DictConfig

from fedsparse.apps.client_app import make_client_app
from fedsparse.apps.server_app import make_server_app
from fedsparse.config import run_dir
from fedsparse.data.glue import describe_shards
from fedsparse.report.results import is_finished, progress, refuse_existing_run
from fedsparse.run import ConfigError, Run, new_run

# Flower warnings about what fedsparse does on purpose, which tell a user nothing: left out of a
# simulation's console unless it is verbose (`quiet_flower`).
QUIET_FLOWER = (
    # the server evaluates centrally; clients evaluate only with federation.evaluate_clients=true
    "fraction_evaluate is set to 0.0",
    # `python -m fedsparse` simulates through it on purpose; deployments use `flwr run`
    "The `run_simulation` function is deprecated",
)


class _QuietFlower(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in QUIET_FLOWER)


def backend_config(cfg: DictConfig) -> dict:
    """Ray settings: one actor per `client_cpus` cores and `client_gpus` of a GPU (Ray's
    `num_gpus`: 0.25 puts four actors on each GPU), on a Ray instance of the run's own or
    attached to `federation.ray_address` (else Ray's own `RAY_ADDRESS`, where it is set: a
    cluster refuses a driver that also asks for `num_cpus`)."""
    fed = cfg.federation
    address = fed.ray_address or os.environ.get("RAY_ADDRESS")
    init_args = (
        {"address": str(address)}
        if address
        else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    )
    resources = {"num_cpus": fed.client_cpus, "num_gpus": float(fed.get("client_gpus", 0) or 0.0)}
    return {"client_resources": resources, "init_args": init_args}


def client_gpu_problem(cfg: DictConfig) -> str | None:
    """Why the simulated clients cannot have the device `train.device` asks for, or None. With
    `client_gpus=0` they train on the CPU (`client_train.client_device`), so `cuda` is refused;
    with `client_gpus>0` a Ray instance of the run's own needs a GPU to share."""
    device, gpus = str(cfg.train.get("device", "auto")), cfg.federation.get("client_gpus", 0) or 0
    if not gpus and device.startswith("cuda"):
        return (
            f"train.device={device}: simulated clients get no GPU with federation.client_gpus=0; "
            "set federation.client_gpus (e.g. 0.25) or train.device=auto|cpu"
        )
    if gpus and device == "cpu":
        return f"federation.client_gpus={gpus} with train.device=cpu: the GPU share would go unused; set one of them"
    if gpus and not (cfg.federation.ray_address or os.environ.get("RAY_ADDRESS")):
        import torch  # only here: this module is imported where torch is not needed

        if not torch.cuda.is_available():
            return (
                f"federation.client_gpus={gpus}: no GPU is visible to this process for Ray to share "
                "(the actors would never start); set federation.client_gpus=0"
            )
    return None


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables that are not set already, for the duration of the block."""
    added = {k: v for k, v in variables.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Flower's log without the QUIET_FLOWER warnings, and its Ray actors' log at ERROR only, for
    the duration of the block (unless `verbose`). An actor's only warning is "Manually terminating
    ClientAppActor" when the simulation ends; the actors are other processes, where no filter of
    this one applies, so they get Flower's FLWR_LOG_LEVEL (read when an actor imports Flower),
    unless it is set already. A ClientApp's errors still show."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        yield
        return
    quiet = _QuietFlower()
    flwr_logger.addFilter(quiet)
    try:
        with environment(FLWR_LOG_LEVEL="ERROR"):
            yield
    finally:
        flwr_logger.removeFilter(quiet)


def set_ray_defaults() -> None:
    """Ray settings, where not set already, for the Ray instance started next (its workers
    inherit them). Ray starts workers at nice 15: beside any other busy process on the machine
    the clients would get a small share of the CPU and the run would crawl.

    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 keeps Ray quiet, and leaves every GPU visible to an actor
    given 0 GPUs: which is why a simulated client with `federation.client_gpus=0` trains on the CPU
    by rule (`client_train.client_device`), not by what it sees. An actor given a GPU share sees
    only its GPU (Ray sets its CUDA_VISIBLE_DEVICES)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")


def run_simulation(run: Run | DictConfig, verbose: bool = False) -> Path:
    """Simulate `federation.num_clients` nodes; returns the run directory. A config is a new run."""
    run = run if isinstance(run, Run) else new_run(run)
    cfg = run.cfg
    refuse_existing_run(cfg)  # before anything is written or started
    problem = client_gpu_problem(cfg)
    if problem:
        raise ConfigError(problem)
    describe_shards(cfg, run_dir(cfg))
    set_ray_defaults()
    # Ray's workers inherit this environment: each actor computes on its own cores only, where
    # torch's default (every core in every actor) would oversubscribe the machine.
    threads = str(max(1, int(cfg.federation.client_cpus)))
    with environment(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads), quiet_flower(verbose):
        flwr_run_simulation(
            server_app=make_server_app(run),
            client_app=make_client_app(cfg),  # the server's own config object: one resolved config
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    out = run_dir(cfg)
    if not is_finished(out):
        raise RuntimeError(
            f"The simulation ended before its last round ({progress(out)} in {out}): "
            "see the Flower log above for the error (rerun with verbose logging)."
        )
    return out
