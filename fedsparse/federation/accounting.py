"""Byte accounting: every message's serialized size, measured on the grid into a per-round ledger."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import error_to_proto, message_to_proto, metadata_to_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid

from fedsparse.federation import compression
from fedsparse.federation.protocol import ARRAYS_KEY

BREAKDOWN = ("values", "head", "indices", "overhead")


def wire_bytes(message: Message) -> int:
    """Size of the message as Flower serializes it (what a deployment would transmit)."""
    return message_to_proto(message).ByteSize()


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_len(size: int) -> int:
    """Bytes of a length-delimited protobuf field with a one-byte tag and `size` bytes of payload."""
    return 1 + _varint_len(size) + size


def message_sizes(messages: Iterable[Message]) -> list[int]:
    """`wire_bytes` of each message, serializing each distinct content once: a broadcast's shared
    content is measured once, and each message adds only its own metadata."""
    content_bytes: dict[int, int] = {}
    sizes = []
    for m in messages:
        error = error_to_proto(m.error) if m.has_error() else None
        size = ProtoMessage(metadata=metadata_to_proto(m.metadata), error=error).ByteSize()
        if m.has_content():
            key = id(m.content)  # the messages are alive together: ids are unique
            if key not in content_bytes:
                content_bytes[key] = recorddict_to_proto(m.content).ByteSize()
            size += _field_len(content_bytes[key])
        sizes.append(size)
    return sizes


def _npy_header(num_values: int) -> bytes:
    """The .npy header `Array(ndarray)` writes before `num_values` float32 values."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header | {"shape": (num_values,)})
    return buffer.getvalue()


def full_model_bytes(num_parameters: int) -> int:
    """`wire_bytes` of a train message carrying `num_parameters` float32 values (the `full`
    reference), computed without building them: the message is serialized with the array's data
    cut to its header, and each enclosing length prefix is then grown by varint arithmetic."""
    header = _npy_header(num_parameters)
    array = Array(dtype="float32", shape=(num_parameters,), stype="numpy.ndarray", data=header)
    content = RecordDict({ARRAYS_KEY: ArrayRecord({"values": array})})
    proto = message_to_proto(Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN))
    record_item = proto.content.items[0]
    array_item = record_item.array_record.items[0]
    nested = [array_item.value, array_item, record_item.array_record, record_item, proto.content, proto]
    old, new = len(header), len(header) + 4 * num_parameters
    grown = new - old + _varint_len(new) - _varint_len(old)  # the data field itself
    for inner in nested[:-1]:  # each enclosing message's length prefix of the grown one
        size = inner.ByteSize()
        grown += _varint_len(size + grown) - _varint_len(size)
    return proto.ByteSize() + grown


def message_kind(message: Message) -> str:
    """The ledger's kind: the message type, or for SecAgg+ its stage (the masked-vector exchange,
    which carries the model, counts as `train`)."""
    stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
    if stage is None:
        return message.metadata.message_type
    return MessageType.TRAIN if stage == Stage.COLLECT_MASKED_VECTORS else f"secagg-{stage}"


class CommLedger:
    """Per-round, per-client, per-direction byte counts and payload breakdown."""

    def __init__(self, head_size: int):
        self.head_size = head_size
        self.rounds: dict[int, list[dict]] = {}

    def add(
        self, server_round: int, kind: str, direction: str, node: int, size: int, content: RecordDict
    ) -> None:
        """One message of `size` bytes; the packed vector's entries in its content, if any, are
        split into values, head and indices."""
        arrays = content.array_records.get(ARRAYS_KEY, {})
        values, indices = (_nbytes(arrays[k]) if k in arrays else 0 for k in ("values", "indices"))
        head = min(values, 4 * self.head_size)
        if compression.KEY in arrays:  # a compressed update: its header, scales and codes count as values
            values = _nbytes(arrays[compression.KEY])
            head = _compressed_head(arrays[compression.KEY], self.head_size)
        entry = {
            "kind": kind,
            "direction": direction,
            "node": int(node),
            "bytes": size,
            "values": values - head,
            "head": head,
            "indices": indices,
            "overhead": size - values - indices,
        }
        self.rounds.setdefault(server_round, []).append(entry)

    def summary(self, server_round: int) -> dict:
        """Totals for one round: `down`/`up` for training messages, `eval_down`/`eval_up` for
        the optional client-side evaluation, with per-client means and the payload breakdown."""
        entries = self.rounds.get(server_round, [])
        out = {}
        for kind, prefix in (("train", ""), ("evaluate", "eval_")):
            for direction in ("down", "up"):
                mine = [e for e in entries if e["kind"] == kind and e["direction"] == direction]
                total = sum(e["bytes"] for e in mine)
                out[prefix + direction] = {
                    "messages": len(mine),
                    "bytes": total,
                    "per_client": total / len(mine) if mine else 0.0,
                    **{k: sum(e[k] for e in mine) for k in BREAKDOWN},
                }
        out["clients"] = sorted({e["node"] for e in entries if e["kind"] == "train"})
        out["query_bytes"] = sum(e["bytes"] for e in entries if e["kind"] == "query")
        out["total_bytes"] = sum(e["bytes"] for e in entries)
        return out


def _compressed_head(array: Array, head_size: int) -> int:
    """The head's share of a compressed update's bytes: its last `head_size` values' codes and
    scales, pro rata (0 for a malformed array, which the server drops anyway)."""
    try:
        _, _, n = compression.read_header(array.numpy())
    except ValueError:
        return 0
    return round(_nbytes(array) * min(head_size, n) / n) if n else 0


def _nbytes(array: Array) -> int:
    """The array's raw size, from its header (no deserialization)."""
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


class MeteredGrid:
    """The grid, with every message it sends and every reply it receives measured into the ledger
    under the round `current_round()` names; the one place where bytes are counted."""

    def __init__(self, grid: Grid, ledger: CommLedger, current_round: Callable[[], int]):
        self._grid = grid
        self._ledger = ledger
        self._round = current_round

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        kinds = {}  # node -> the kind of its message, hence of its reply
        for m, size in zip(messages, message_sizes(messages), strict=True):
            kinds[m.metadata.dst_node_id] = kind = message_kind(m)
            self._ledger.add(self._round(), kind, "down", m.metadata.dst_node_id, size, m.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        received = [r for r in replies if not r.has_error()]
        for r, size in zip(received, message_sizes(received), strict=True):
            node = r.metadata.src_node_id
            self._ledger.add(
                self._round(), kinds.get(node, r.metadata.message_type), "up", node, size, r.content
            )
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
