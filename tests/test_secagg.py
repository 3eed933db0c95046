"""SecAgg+ on the packed update: the real server bridge and client mods, in one process.

An in-memory grid hands every message, serialized and parsed back as a deployment would, to the
real ClientApp pieces (privacy mod chain + `handle_train` on the tiny model), so the test sees
each client's reply before masking and can hold the secure sum against plain FedAvg of the
very same replies.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common import bytes_to_ndarray
from harness.federation import TRAIN_CONFIG_VALUES
from harness.loopback import deploy_tiny

from fedsparse.apps.inprocess import InProcessGrid, wire_copy
from fedsparse.apps.server_app import make_strategy
from fedsparse.data.glue import largest_shard, partition_all, train_split
from fedsparse.federation.accounting import CommLedger, wire_bytes
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model
from fedsparse.privacy import dp
from fedsparse.privacy.secagg import SecAggRunner
from fedsparse.report.results import read_run
from fedsparse.report.tables import format_comm_table, human_bytes
from fedsparse.run import compose_config

CLIENTS = 3  # the tiny federation's (`+experiment=smoke`), all sampled
BASE = ["+experiment=smoke", "method=pafi", "method.density=0.2", "privacy.secagg=true"]
TRAIN_CONFIG = ConfigRecord(TRAIN_CONFIG_VALUES)


def _secure_round(overrides: list[str], min_replies: int | None = None):
    """One SecAgg+ round; returns (cfg, grid, what the aggregation received, runner, method).
    `min_replies` is set after validation: a quorum above the clients that reply (the config
    refuses one above clients_per_round; in a run it happens when clients drop out)."""
    cfg = compose_config(overrides)
    if min_replies is not None:
        cfg.federation.min_replies = min_replies
    method = build_method(load_model("tiny-bert", 2, cfg.seed), cfg.method)
    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    seen = []
    inner = strategy._aggregate

    def spy(server_round, replies):
        seen.append([r.content["arrays"]["values"].numpy().copy() for r in replies])
        arrays, metrics = inner(server_round, replies)
        seen.append(arrays["values"].numpy().copy())
        return arrays, metrics

    strategy._aggregate = spy
    grid = InProcessGrid(cfg)
    runner = SecAggRunner(strategy, cfg, largest_shard(cfg))
    runner.start(
        grid=grid,
        initial_arrays=ArrayRecord({"values": Array(method.initial_state())}),
        num_rounds=1,
        train_config=TRAIN_CONFIG,
    )
    return cfg, grid, seen, runner, method


@pytest.fixture(scope="module")
def secure_round(module_app_identity):
    return _secure_round(BASE)


def test_secure_sum_equals_plain_fedavg_of_the_same_replies(secure_round):
    cfg, grid, seen, runner, method = secure_round
    assert len(grid.trained) == CLIENTS
    plain = make_strategy(cfg, method, CommLedger(method.head_size))
    plain.global_values = method.initial_state()
    expected, _ = plain.aggregate_train(1, [wire_copy(r) for r in grid.trained])
    secure = seen[1]
    weights = np.array([r.content["metrics"]["num-examples"] for r in grid.trained], dtype=np.float64)
    assert len(set(weights)) > 1 and runner.max_weight == weights.max()
    # quantisation: step 2C/Q on each client's update scaled by n_i/max_weight, divided by the
    # sum of those scales; plus float32 rounding of the values themselves
    p = cfg.privacy
    bound = (
        CLIENTS * 2 * p.secagg_clipping_range / p.secagg_quantization_range / (weights / weights.max()).sum()
    )
    error = np.abs(secure.astype(np.float64) - expected["values"].numpy())
    assert error.max() <= bound + 1e-6, (error.max(), bound)
    assert error.max() > 0  # it is the quantised sum, not a copy of FedAvg's
    print(f"SecAgg+ quantisation error: max {error.max():.2e}, mean {error.mean():.2e}, bound {bound:.2e}")


def test_the_strategy_never_receives_an_individual_unmasked_vector(secure_round):
    _, grid, seen, runner, method = secure_round
    (replies, aggregate) = seen
    assert len(replies) == 1 and np.array_equal(replies[0], aggregate)  # one reply: the sum
    g = method.initial_state()
    for trained in grid.trained:  # and it is no client's vector
        assert np.abs(trained.content["arrays"]["values"].numpy() - replies[0]).max() > 1e-4
    for reply in grid.received:  # nothing the server got carries an array in the clear
        assert all(len(record) == 0 for record in reply.content.array_records.values())
    updates = [t.content["arrays"]["values"].numpy() - g for t in grid.trained]
    configs = [r.content.config_records.get("secaggplus_configs", {}) for r in grid.received]
    masked = [c["masked_params"] for c in configs if "masked_params" in c]
    assert len(masked) == CLIENTS
    for data in masked:
        factor, vector = (bytes_to_ndarray(b) for b in data)  # SecAgg+'s weight factor, then the vector
        assert vector.dtype == np.int64 and vector.size == g.size
        assert not any(np.allclose(vector, u) for u in updates)


def test_secagg_rounds_are_measured_with_their_extra_messages(secure_round):
    cfg, grid, _, runner, _ = secure_round
    record = dp.round_record(cfg, runner, 1)["privacy"]
    stages = record["secagg_stages"]
    assert set(stages) == {"secagg-setup", "secagg-share_keys", "train", "secagg-unmask"}
    assert all(s["messages"] == 2 * CLIENTS for s in stages.values())  # one down, one up per client
    assert record["secagg_extra_bytes"] > 0 and record["clipped_entries"] == 0 and not record["failures"]
    summary = runner.strategy.ledger.summary(1)
    plain_up = np.mean([wire_bytes(r) for r in grid.trained])
    ratio = summary["up"]["per_client"] / plain_up
    assert 1.8 < ratio < 2.3, ratio  # the masked upload is int64: about twice the float32 reply
    assert summary["total_bytes"] >= sum(s["down"] + s["up"] for s in stages.values())
    history = [
        {},
        {"round": 1, "comm": summary, "cumulative_bytes": summary["total_bytes"], "ratio_to_full": 0.1},
    ]
    table = format_comm_table(history)  # the printed table shows the key exchange
    assert (
        "other msgs" in table and human_bytes(record["secagg_extra_bytes"] + summary["query_bytes"]) in table
    )
    print(
        f"SecAgg+ upload {summary['up']['per_client']:.0f} B vs plain {plain_up:.0f} B ({ratio:.2f}x); extra {record['secagg_extra_bytes']} B"
    )


@pytest.mark.integration
def test_secagg_in_a_loopback_deployment(tmp_path):
    """A real SuperLink and two SuperNodes through `flwr run` (harness.loopback). One round: each
    SecAgg+ stage is a message, and a SuperNode starts a ClientApp process per message (5 per node
    here, with the partition-id query)."""
    _, rounds, summary = read_run(deploy_tiny(tmp_path, rounds=1, extra=("privacy.secagg=true",)).run_dir)
    assert summary["rounds"] == 1 and len(rounds) == 2
    for r in rounds[1:]:
        record = r["privacy"]
        assert record["clients"] == 2 and not record["failures"] and record["clipped_entries"] == 0
        assert set(record["secagg_stages"]) == {"secagg-setup", "secagg-share_keys", "train", "secagg-unmask"}
        up = r["comm"]["up"]
        assert up["messages"] == 2 and up["values"] == 0  # only masked vectors came up
        assert up["per_client"] > 1.8 * 4 * summary["values_per_message"]  # int64, not float32
        assert r["train"]["train-loss"] > 0


def test_a_secagg_round_below_the_quorum_is_skipped(app_identity):
    _, grid, seen, runner, _ = _secure_round(BASE, min_replies=CLIENTS + 1)
    assert len(grid.trained) == CLIENTS and not seen  # every client trained; nothing was aggregated
    assert f"min_replies={CLIENTS + 1}" in runner.strategy.skipped[1]


def test_secagg_checks_max_examples_on_each_client_not_on_the_sum(app_identity):
    cfg = compose_config(BASE)
    fed = cfg.federation
    shards = partition_all(
        train_split(cfg), fed.num_clients, fed.partitioner, fed.alpha, cfg.seed, fed.min_partition_size
    )
    largest, total = max(map(len, shards)), sum(map(len, shards))
    _, _, seen, runner, _ = _secure_round(BASE + [f"federation.max_examples={largest}"])
    assert largest < total and len(seen) == 2  # the sum of `total` examples was aggregated
    assert not runner.strategy.skipped and not runner.strategy.rejected
    _, _, seen, runner, _ = _secure_round(BASE + [f"federation.max_examples={largest - 1}"])
    assert not seen and "1 rejected" in runner.strategy.skipped[1]  # its update is in the sum
    (reason,) = runner.strategy.rejected[1]
    assert f"'num-examples' is {largest}" in reason
