"""Reply validation in the server strategy: bad replies are dropped with a reason, never absorbed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import method_cfg, packed_strategy, tiny_model
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsparse.methods import build_method


@pytest.fixture
def strategy(app_identity):
    return packed_strategy(build_method(tiny_model(), method_cfg("pafi", density=0.05)))


def _reply(
    values: np.ndarray,
    weight: float = 10,
    fingerprint: str | None = None,
    strategy=None,
    extra: dict | None = None,
) -> Message:
    arrays = {"values": Array(values), **(extra or {})}
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"num-examples": weight}),
            "info": ConfigRecord({"fingerprint": fingerprint or strategy.fingerprint}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_bad_replies_are_dropped_and_the_rest_aggregated(strategy):
    g = strategy.global_values
    good = [g + 1.0, g + 3.0]
    nan = g.copy()
    nan[0] = np.nan
    replies = [
        _reply(good[0], 10, strategy=strategy),
        _reply(good[1], 30, strategy=strategy),
        _reply(nan, 5, strategy=strategy),
        _reply(g + 100, 5, fingerprint="0" * 64, strategy=strategy),
        _reply(g[:-1] + 100, 5, strategy=strategy),
        _reply(g.astype(np.float64) + 100, 5, strategy=strategy),
        _reply(g + 100, 0, strategy=strategy),
        _reply(g + 100, 5, strategy=strategy, extra={"indices": Array(np.arange(3, dtype=np.int32))}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["values"].numpy(), g + 2.5, rtol=0, atol=1e-5)  # (10*1 + 30*3) / 40
    reasons = " | ".join(strategy.rejected[1])
    for why in ("NaN", "fingerprint", "entries", "float32", "positive", "array names"):
        assert why in reasons
    assert len(strategy.rejected[1]) == 6
    assert strategy.ledger.summary(1)["up"]["messages"] == 8  # every reply's bytes are counted


def test_a_round_with_only_bad_replies_keeps_the_global_state(strategy):
    g = strategy.global_values
    arrays, metrics = strategy.aggregate_train(1, [_reply(g + 1, 5, fingerprint="x", strategy=strategy)])
    assert arrays is None and metrics is None and len(strategy.rejected[1]) == 1
