"""Tiny models, the shipped method configs, and a one-client strategy on a method's packed vector."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedsparse.federation.accounting import CommLedger
from fedsparse.federation.sampling import ClientSampler
from fedsparse.federation.strategy import PackedFedAvg
from fedsparse.methods.model import TINY_BERT, load_model

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "fedsparse" / "conf"
SHARED_GLUE = REPO.parent / "shared" / "glue"


def method_cfg(name: str, **overrides) -> DictConfig:
    """The shipped `method/<name>.yaml` with overrides (what `method.x=...` does on the CLI)."""
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def tiny_model(num_labels: int = 2, seed: int = 0):
    return load_model(TINY_BERT, num_labels, seed=seed)


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
