"""TRAIN replies as a client's `handle_train` sends them (values, weight, fingerprint)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict


def train_reply(
    values: np.ndarray | dict[str, np.ndarray],
    weight: float,
    fingerprint: str,
    extra: dict | None = None,
    metrics: dict | None = None,
    records: dict | None = None,
) -> Message:
    """A reply carrying `values` (the packed vector, or a method's wire dict such as top-k's
    values and indices) trained on `weight` examples by a method with `fingerprint`. `extra`:
    more arrays (Array objects), `metrics`: more or other metrics, `records`: more records."""
    arrays = values if isinstance(values, dict) else {"values": values}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()} | (extra or {})),
            "metrics": MetricRecord(
                {"num-examples": weight, "train-loss": 0.5, "train-seconds": 1.0, "setup-seconds": 0.5}
                | (metrics or {})
            ),
            "info": ConfigRecord({"fingerprint": fingerprint}),
            **(records or {}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
