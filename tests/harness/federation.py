"""The tiny federation the integration tests run: `+experiment=smoke` (tiny-bert, 3 clients, all
sampled, 2 rounds of 2 local steps of batch 8, 600 train examples, 32 tokens) with 32 dev
examples instead of smoke's 64. A test adds its own settings explicitly: `tiny("seed=4", ...)`."""

from __future__ import annotations

SMOKE = ("+experiment=smoke", "data.max_eval_examples=32")


def tiny(*overrides: str) -> list[str]:
    """The tiny federation's overrides, then `overrides` (later overrides win)."""
    return [*SMOKE, *overrides]


# The loopback deployment's run (tests/test_deployment.py and the tests that share its harness):
# two SuperNodes, both sampled, PaFi at density 0.05.
DEPLOYMENT = tiny(
    "federation.num_clients=2",
    "federation.clients_per_round=2",
    "data.max_train_examples=400",
    "method.density=0.05",
)

# A SuperNode killed mid-round (tests/test_deployment_faults.py, tests/test_containers.py): three
# nodes, all sampled, quorum 2, and a short grace period (5 s; 60 s by default) after the quorum.
KILLED_SETTINGS = [
    *DEPLOYMENT,
    "federation.num_clients=3",
    "federation.clients_per_round=3",
    "federation.min_replies=2",
    "federation.rounds=3",
    "federation.round_timeout=600",
    "federation.grace_min=5",
    "federation.grace_factor=0.5",
    "federation.wait_timeout=120",
]

# The in-process compressed federation (tests/test_compression.py, tests/test_downlink.py): three
# clients, two sampled a round (clients skip rounds), PaFi at density 0.2; a test adds its
# `compression=` group and run name.
PARTIAL_PARTICIPATION = [
    "model=tiny",
    "method=pafi",
    "method.density=0.2",
    "compression.block=128",
    "federation.num_clients=3",
    "federation.clients_per_round=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "data.max_train_examples=300",
    "data.max_length=32",
]

# The train config a test server sends with each round (what ServerApp builds from `train.*`).
TRAIN_CONFIG_VALUES = {"lr": 2e-2, "batch-size": 8, "local-steps": 2, "local-epochs": 0.0}
