"""The server strategy: every reply is reduced to what aggregation reads or dropped with a reason,
a round below quorum changes nothing, and no server optimiser moves an entry nobody trained."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from harness.models import method_cfg, packed_strategy, tiny_model
from harness.replies import train_reply

from fedsparse.federation.accounting import CommLedger
from fedsparse.federation.sampling import ClientSampler
from fedsparse.federation.strategy import STRATEGIES
from fedsparse.methods import METHODS, build_method


@pytest.fixture
def strategy(app_identity):
    return packed_strategy(build_method(tiny_model(), method_cfg("pafi", density=0.05)))


def _reply(values, weight=10, fingerprint=None, strategy=None, extra=None, metrics=None, records=None):
    """harness.replies.train_reply, by default from `strategy`'s method."""
    return train_reply(values, weight, fingerprint or strategy.fingerprint, extra, metrics, records)


def _without(reply: Message, record: str) -> Message:
    del reply.content[record]
    return reply


def test_bad_replies_are_dropped_and_the_rest_aggregated(strategy):
    g = strategy.global_values
    good = [g + 1.0, g + 3.0]
    nan = g.copy()
    nan[0] = np.nan
    bad = {
        "NaN": _reply(nan, 5, strategy=strategy),
        "fingerprint": _reply(g + 100, 5, fingerprint="0" * 64, strategy=strategy),
        "entries": _reply(g[:-1] + 100, 5, strategy=strategy),
        "float32": _reply(g.astype(np.float64) + 100, 5, strategy=strategy),
        "whole number": _reply(g + 100, 0, strategy=strategy),
        "array names": _reply(
            g + 100, 5, strategy=strategy, extra={"indices": Array(np.arange(3, dtype=np.int32))}
        ),
        "lack": _without(_reply(g + 100, 5, strategy=strategy), "info"),
        "finite number": _reply(g + 100, 5, strategy=strategy, metrics={"train-loss": float("inf")}),
        "1..": _reply(g + 100, 2.5, strategy=strategy),
        "max_examples": _reply(g + 100, 10**12, strategy=strategy),
        "exceeds": _reply(np.zeros(2**19, np.float32), 5, strategy=strategy),
    }
    replies = [_reply(good[0], 10, strategy=strategy), _reply(good[1], 30, strategy=strategy), *bad.values()]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["values"].numpy(), g + 2.5, rtol=0, atol=1e-5)  # (10*1 + 30*3) / 40
    assert metrics["train-loss"] == pytest.approx(0.5)
    reasons = strategy.rejected[1]
    assert len(reasons) == len(bad)
    for why, reason in zip(bad, reasons, strict=True):
        assert why in reason


def test_extra_records_and_keys_are_ignored_not_fatal(strategy):
    """Flower's FedAvg raises on inconsistent replies; the strategy reduces them first."""
    g = strategy.global_values
    replies = [
        _reply(g + 1.0, 10, strategy=strategy, metrics={"accuracy": 0.9}),
        _reply(g + 3.0, 30, strategy=strategy, records={"more": ArrayRecord({"x": Array(np.ones(2))})}),
        _reply(g + 3.0, 10, strategy=strategy, records={"stats": MetricRecord({"y": 1.0})}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["values"].numpy(), g + 2.6, rtol=0, atol=1e-5)
    assert set(metrics) == {"train-loss", "train-seconds", "setup-seconds"}  # Flower drops the weight key
    assert 1 not in strategy.rejected
    notes = " | ".join(strategy.trimmed[1])
    assert "metric keys ['accuracy']" in notes and "array records ['more']" in notes
    assert "metric records ['stats']" in notes


def test_a_round_below_quorum_keeps_the_global_state(strategy):
    g = strategy.global_values
    arrays, metrics = strategy.aggregate_train(1, [_reply(g + 1, 5, fingerprint="x", strategy=strategy)])
    assert arrays is None and metrics is None and len(strategy.rejected[1]) == 1
    strategy.min_replies = 2
    assert strategy.aggregate_train(2, [_reply(g + 1, 5, strategy=strategy)]) == (None, None)
    assert "min_replies=2" in strategy.skipped[2]


class _OneNodeGrid:
    """Just enough of a Grid for configure_train: one node, partition 0."""

    def get_node_ids(self) -> list[int]:
        return [7]


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_server_optimisers_never_move_an_entry_no_client_changed(app_identity, kind, name):
    """Two rounds with replies changing only entries 0..4: every other entry stays bit-exact,
    through FedAvgM's momentum and FedAdam's moments included (topk's float32 noise case)."""
    cfg = method_cfg(name, **({"density": 0.05} if name in ("pafi", "topk") else {}))
    method = build_method(tiny_model(), cfg)
    sampler = ClientSampler(seed=0, clients_per_round=1, num_clients=1)
    sampler.node_of = {0: 7}  # discovered: partition 0 is node 7
    strat = STRATEGIES[kind](
        method=method,
        ledger=CommLedger(method.head_size),
        sampler=sampler,
        min_available_nodes=1,
        min_train_nodes=1,
    )
    arrays = ArrayRecord({"values": Array(method.initial_state())})
    start = arrays["values"].numpy().copy()
    for server_round in (1, 2):
        strat.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), _OneNodeGrid())
        g = strat.global_values
        replies = []
        for weight, step in ((7, 1e-3), (11, 3e-3), (13, 2e-3)):  # weights that round in float32
            local = g.copy()
            local[:5] += step
            wire = method.encode(local, reference=g)
            replies.append(_reply(wire, weight, strategy=strat))
        arrays, _ = strat.aggregate_train(server_round, replies)
        assert arrays is not None, strat.rejected
    final = arrays["values"].numpy()
    assert np.array_equal(final[5:], start[5:])
    assert not np.array_equal(final[:5], start[:5])
