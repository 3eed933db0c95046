"""Shared fixtures: offline environment, tiny models, method configs from the real YAML."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

for _var in (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
    "FLWR_DISABLE_UPDATE_CHECK",
):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a fresh disk cache (fedsparse.data.cache) per test session, inherited by the Flower processes
if "FEDSPARSE_CACHE_DIR" not in os.environ:
    os.environ["FEDSPARSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedsparse-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FEDSPARSE_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedsparse.federation.accounting import CommLedger  # noqa: E402
from fedsparse.federation.sampling import ClientSampler  # noqa: E402
from fedsparse.federation.strategy import PackedFedAvg  # noqa: E402
from fedsparse.methods.model import TINY_BERT, load_model  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "fedsparse" / "conf"
SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


def method_cfg(name: str, **overrides) -> DictConfig:
    """The shipped `method/<name>.yaml` with overrides (what `method.x=...` does on the CLI)."""
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def tiny_model(num_labels: int = 2, seed: int = 0):
    return load_model(TINY_BERT, num_labels, seed=seed)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (4, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


@pytest.fixture
def app_identity():
    """Messages can only be built inside a running app; pose as one (Flower internal API)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def packed_strategy(method) -> PackedFedAvg:
    """A one-client FedAvg on `method`'s packed vector, holding the initial global state."""
    strat = PackedFedAvg(
        method=method,
        ledger=CommLedger(method.head_size),
        sampler=ClientSampler(seed=0, clients_per_round=1, num_clients=1),
        min_available_nodes=1,
    )
    strat.global_values = method.initial_state()
    return strat


@pytest.fixture(scope="session")
def shared_ray():
    """One Ray head for the session's simulations, which attach to it through `RAY_ADDRESS`
    (`fedsparse.apps.simulation.backend_config`): a Ray instance of their own costs each run seconds
    of start and stop. The head is started with the Ray settings `run_simulation` sets for a Ray
    instance of its own, so that its workers inherit them."""
    if os.environ.get("RAY_ADDRESS"):  # the caller's own cluster
        yield os.environ["RAY_ADDRESS"]
        return
    from ray_head import ray_head

    from fedsparse.apps.simulation import set_ray_defaults

    set_ray_defaults()
    with ray_head(num_cpus=os.cpu_count() or 1) as (address, _):
        os.environ["RAY_ADDRESS"] = address
        try:
            yield address
        finally:
            os.environ.pop("RAY_ADDRESS", None)
