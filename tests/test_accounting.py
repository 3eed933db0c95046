"""Byte accounting: computed sizes equal Flower's serialization, and the grid counts every message."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedsparse.federation import accounting
from fedsparse.federation.accounting import (
    CommLedger,
    MeteredGrid,
    full_model_bytes,
    message_sizes,
    wire_bytes,
)

# node ids whose varints take 1, 2, 5, 9 and 10 bytes
NODES = [7, 300, 2**30, 2**62, 2**64 - 1]


def _broadcast(values: np.ndarray, message_type: str = MessageType.TRAIN) -> list[Message]:
    """One content object sent to every node, as Flower's FedAvg builds a round's messages."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({"values": Array(values)}),
            "config": ConfigRecord({"lr": 0.1, "server-round": 3, "fingerprint": "ab" * 32}),
        }
    )
    return [Message(content=content, dst_node_id=n, message_type=message_type) for n in NODES]


def test_a_broadcast_is_serialized_once_and_sized_exactly_for_every_recipient(app_identity, monkeypatch):
    messages = _broadcast(np.arange(5000, dtype=np.float32))
    serialized = []
    original = accounting.recorddict_to_proto
    monkeypatch.setattr(accounting, "recorddict_to_proto", lambda c: serialized.append(c) or original(c))
    sizes = message_sizes(messages)
    assert len(serialized) == 1
    assert sizes == [wire_bytes(m) for m in messages]
    assert len(set(sizes)) == len(NODES)  # each node id takes another number of varint bytes


def test_sizes_of_replies_queries_and_errors_are_exact(app_identity):
    down = _broadcast(np.ones(3, np.float32), MessageType.QUERY)
    replies = [
        Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 10 * i})}), reply_to=m)
        for i, m in enumerate(down)
    ]
    replies.append(Message(Error(code=3, reason="node failed"), reply_to=down[0]))
    replies.append(Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.QUERY))
    assert message_sizes(replies) == [wire_bytes(r) for r in replies]


@pytest.mark.parametrize("n", [0, 1, 4_063, 4_064, 524_255, 524_256, 2**21 + 3])
def test_full_model_bytes_is_the_serialized_size(app_identity, n):
    """Sizes on both sides of the varint steps (the data field's length reaches 2^14, then 2^21)."""
    content = RecordDict({"arrays": ArrayRecord({"values": Array(np.zeros(n, np.float32))})})
    message = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    assert full_model_bytes(n) == wire_bytes(message)


class _EchoGrid:
    """Replies to every message with a fixed reply; node 300 fails."""

    def __init__(self, reply_content: RecordDict):
        self.reply_content = reply_content

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return [
            Message(Error(code=3, reason="down"), reply_to=m)
            if m.metadata.dst_node_id == 300
            else Message(self.reply_content, reply_to=m)
            for m in messages
        ]


def test_the_metered_grid_counts_every_message_and_reply_with_its_kind(app_identity):
    ledger = CommLedger(head_size=2)
    reply = RecordDict({"arrays": ArrayRecord({"values": Array(np.ones(10, np.float32))})})
    grid = MeteredGrid(_EchoGrid(reply), ledger, lambda: 4)
    sent = _broadcast(np.zeros(10, np.float32))
    replies = grid.send_and_receive(sent)
    stage = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS})})
    grid.send_and_receive([Message(content=stage, dst_node_id=7, message_type=MessageType.TRAIN)])
    entries = ledger.rounds[4]
    down = [e for e in entries if e["kind"] == "train" and e["direction"] == "down"]
    up = [e for e in entries if e["kind"] == "train" and e["direction"] == "up"]
    assert [e["bytes"] for e in down] == [wire_bytes(m) for m in sent]
    assert [e["bytes"] for e in up] == [wire_bytes(r) for r in replies if not r.has_error()]
    assert [e["node"] for e in up] == [n for n in NODES if n != 300]  # the failed node sent nothing
    assert all(e["values"] == 32 and e["head"] == 8 and e["overhead"] > 0 for e in up)
    assert {e["kind"] for e in entries} == {"train", "secagg-share_keys"}
    summary = ledger.summary(4)
    assert summary["total_bytes"] == sum(e["bytes"] for e in entries)
    assert summary["down"]["messages"] == len(NODES) and summary["up"]["messages"] == len(NODES) - 1
