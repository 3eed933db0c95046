"""The shared fixtures (tests/conftest.py registers this module as a pytest plugin)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fedsparse.apps import client_train
from fedsparse.deploy.loopback import Deployment
from harness.federation import DEPLOYMENT
from harness.loopback import deploy_tiny


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (4, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


@contextmanager
def posing_as_app() -> Iterator[None]:
    """Messages can only be built inside a running app; pose as one (Flower internal API)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def store_dir(tmp_path, monkeypatch) -> Path:
    """A node-local store (FEDSPARSE_CACHE_DIR) of the test's own."""
    monkeypatch.setenv("FEDSPARSE_CACHE_DIR", str(tmp_path))
    return tmp_path


def forget_client_memory() -> None:
    """What a killed client process loses: the cached model, shards and every in-memory state."""
    client_train._method.cache_clear()
    client_train._shard.cache_clear()


@pytest.fixture
def app_identity():
    with posing_as_app():
        yield


@pytest.fixture(scope="module")
def module_app_identity():
    """`app_identity` for a module's shared fixtures."""
    with posing_as_app():
        yield


@pytest.fixture(scope="session")
def shared_ray():
    """One Ray head for the session's simulations, which attach to it through `RAY_ADDRESS`
    (`fedsparse.apps.simulation.backend_config`): a Ray instance of their own costs each run seconds
    of start and stop. The head is started with the Ray settings `run_simulation` sets for a Ray
    instance of its own, so that its workers inherit them."""
    if os.environ.get("RAY_ADDRESS"):  # the caller's own cluster
        yield os.environ["RAY_ADDRESS"]
        return
    from fedsparse.apps.simulation import set_ray_defaults
    from harness.ray_head import ray_head

    set_ray_defaults()
    with ray_head(num_cpus=os.cpu_count() or 1) as (address, _):
        os.environ["RAY_ADDRESS"] = address
        try:
            yield address
        finally:
            os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def simulated(tmp_path_factory, shared_ray) -> Path:
    """The DEPLOYMENT run (2 rounds) in the simulation engine: what every deployment of it
    (loopback, containers) must reproduce."""
    from fedsparse.apps.simulation import run_simulation
    from fedsparse.run import compose_config

    out = tmp_path_factory.mktemp("sim")
    return run_simulation(compose_config([*DEPLOYMENT, f"output_dir={out}", "run_name=simulated"]))


@pytest.fixture(scope="session")
def loopback_deployment(tmp_path_factory) -> Deployment:
    """One plaintext loopback deployment of the DEPLOYMENT run (2 rounds), shared by every test
    that only reads what it left (its run directory, `flwr run`'s output, its socket bytes).
    A test that changes the deployment (TLS, another method, a node killed) starts its own."""
    return deploy_tiny(tmp_path_factory.mktemp("loopback"))


# Fixtures that start a Ray head or Flower processes: a test using one belongs to the integration
# tier, or `make test-fast` would start them.
INTEGRATION_FIXTURES = {"shared_ray", "simulated", "loopback_deployment"}


def pytest_collection_modifyitems(config, items) -> None:
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(INTEGRATION_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
        and item.get_closest_marker("containers") is None
    ]
    if unmarked:
        raise pytest.UsageError("mark these tests `integration`:\n  " + "\n  ".join(unmarked))
