"""Server strategy on packed vectors: validation, wire encoding and byte accounting.

`PackedState` wraps any Message-API FedAvg-family strategy. The global state is one dense
float32 vector ("values"); FedAvg, FedAvgM and FedAdam average it unchanged because every
client's update has the same support. Only `topk` changes the wire format (values + int32
indices); its replies are decoded onto the global vector before the base strategy sees them.
Bytes are measured on the messages themselves with Flower's protobuf serializer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedsparse.methods import Method
from fedsparse.sampling import ClientSampler

log = logging.getLogger("fedsparse")
INFO_KEY = "info"  # ConfigRecord in each reply: the client's method fingerprint
METRICS_KEY = "metrics"
# What a train reply reports: its weight, mean local loss, seconds of local training, and seconds
# from the message's arrival (a fresh deployment process: its start) to the first training step.
TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds", "setup-seconds")


def wire_bytes(message: Message) -> int:
    """Size of the message as Flower serializes it (what a deployment would transmit)."""
    return message_to_proto(message).ByteSize()


class CommLedger:
    """Per-round, per-client, per-direction byte counts and payload breakdown."""

    def __init__(self, head_size: int):
        self.head_size = head_size
        self.rounds: dict[int, list[dict]] = {}

    def add(
        self,
        server_round: int,
        kind: str,
        direction: str,
        message: Message,
        arrays: ArrayRecord | None,
        node_id: int,
    ) -> dict:
        total = wire_bytes(message)
        values = indices = 0
        if arrays is not None:
            if "values" in arrays:
                values = arrays["values"].numpy().nbytes
            if "indices" in arrays:
                indices = arrays["indices"].numpy().nbytes
        head = min(values, 4 * self.head_size)
        entry = {
            "kind": kind,
            "direction": direction,
            "node": int(node_id),
            "bytes": total,
            "values": values - head,
            "head": head,
            "indices": indices,
            "overhead": total - values - indices,
        }
        self.rounds.setdefault(server_round, []).append(entry)
        return entry

    def add_query(self, server_round: int, direction: str, message: Message) -> None:
        """A partition-id query (once per node, see `sampling`): counted in the round's total."""
        meta = message.metadata
        self.add(
            server_round,
            "query",
            direction,
            message,
            None,
            meta.dst_node_id if direction == "down" else meta.src_node_id,
        )

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
                    **{k: sum(e[k] for e in mine) for k in ("values", "head", "indices", "overhead")},
                }
        out["clients"] = sorted({e["node"] for e in entries if e["kind"] == "train"})
        out["query_bytes"] = sum(e["bytes"] for e in entries if e["kind"] == "query")
        out["total_bytes"] = sum(e["bytes"] for e in entries)
        return out


class PackedState:
    """Mixin for a Message-API strategy: encode downlinks, validate and decode uplinks, count bytes.

    Every reply is reduced to exactly the records and keys Flower's aggregation expects (the
    decoded dense vector and `TRAIN_METRICS`) or dropped with a reason; a round with fewer than
    `min_replies` accepted replies is skipped and leaves the global state as it was. Rounds are
    numbered from `round_offset + 1`, so a resumed run continues the numbering (and with it the
    client sampling and the clients' seeds) of the run it resumes.
    """

    def __init__(
        self,
        *args,
        method: Method,
        ledger: CommLedger,
        sampler: ClientSampler,
        lr_decay: float = 1.0,
        min_replies: int = 1,
        max_examples: int = 10_000_000,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.lr_decay = lr_decay  # the clients' learning rate is multiplied by this every round
        self.method = method
        self.ledger = ledger
        self.sampler = sampler
        sampler.on_message = ledger.add_query
        self.min_replies = min_replies
        self.max_examples = max_examples  # a larger `num-examples` would dominate the average
        self.max_reply_bytes = 8 * method.num_values() + 2**20  # values + indices + generous framing
        self.round_offset = 0
        self.fingerprint = method.fingerprint()
        self.global_values: np.ndarray | None = None
        self.rejected: dict[int, list[str]] = {}
        self.trimmed: dict[int, list[str]] = {}
        self.skipped: dict[int, str] = {}
        self.train_metrics: dict[int, MetricRecord] = {}
        self.untouched: np.ndarray | None = None
        self.client_eval: dict[int, MetricRecord] = {}

    def _send(
        self, server_round: int, kind: str, messages: Iterable[Message], arrays: ArrayRecord
    ) -> list[Message]:
        messages = list(messages)
        self.global_values = arrays["values"].numpy()
        wire = ArrayRecord({k: Array(v) for k, v in self.method.encode(self.global_values).items()})
        for message in messages:
            message.content[self.arrayrecord_key] = wire
            self.ledger.add(server_round, kind, "down", message, wire, message.metadata.dst_node_id)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        server_round += self.round_offset
        config = ConfigRecord(dict(config))  # the caller passes the same record every round
        config["lr"] = float(config["lr"]) * self.lr_decay ** (server_round - 1)
        config["fingerprint"] = self.fingerprint
        grid = self.sampler.sample(grid, server_round, "train")
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._send(server_round, "train", messages, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        server_round += self.round_offset
        config["fingerprint"] = self.fingerprint
        grid = self.sampler.sample(grid, server_round, "evaluate")
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._send(server_round, "evaluate", messages, arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = []
        self.untouched = None  # entries every accepted reply left exactly at the global value
        for reply in self.sampler.order(replies):
            if reply.has_error():
                self._reject(server_round, reply, f"client error: {reply.error.reason}")
                continue
            arrays = reply.content.array_records.get(self.arrayrecord_key)
            size = self.ledger.add(server_round, "train", "up", reply, arrays, reply.metadata.src_node_id)[
                "bytes"
            ]
            problem = self._reduce_train_reply(server_round, reply, size)
            if problem:
                self._reject(server_round, reply, problem)
                continue
            accepted.append(reply)
        if len(accepted) < self.min_replies:
            self.skipped[server_round] = (
                f"{len(accepted)} accepted replies < federation.min_replies={self.min_replies}; "
                "the global state is unchanged"
            )
            log.warning("round %d skipped: %s", server_round, self.skipped[server_round])
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if metrics is not None:
            self.train_metrics[server_round] = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        accepted = []
        for reply in self.sampler.order(replies):
            if reply.has_error():
                self._reject(server_round, reply, f"client error in evaluation: {reply.error.reason}")
                continue
            self.ledger.add(server_round, "evaluate", "up", reply, None, reply.metadata.src_node_id)
            metrics = reply.content.metric_records.get(METRICS_KEY)
            problem = "reply lacks its metrics record" if metrics is None else self._check_metrics(metrics)
            if problem:
                self._reject(server_round, reply, f"evaluation: {problem}")
                continue
            accepted.append(reply)
        # Flower averages only replies with one MetricRecord and identical keys: keep the keys
        # every accepted reply has.
        common = set.intersection(*(set(r.content[METRICS_KEY]) for r in accepted)) if accepted else set()
        for reply in accepted:
            record = reply.content[METRICS_KEY]
            self._trim(server_round, reply, "metric keys", set(record) - common)
            reply.content = RecordDict({METRICS_KEY: MetricRecord({k: record[k] for k in sorted(common)})})
        metrics = super().aggregate_evaluate(server_round, accepted) if accepted else None
        if metrics is not None:
            self.client_eval[server_round] = metrics
        return metrics

    def _reduce_train_reply(self, server_round: int, reply: Message, size: int) -> str | None:
        """Replace the reply's content by exactly what the aggregation reads (the dense vector
        and `TRAIN_METRICS`), or say why the reply must be dropped."""
        if size > self.max_reply_bytes:
            return f"reply of {size:,} bytes exceeds the {self.max_reply_bytes:,}-byte limit for this method"
        problem = self.check_reply(reply)
        if problem:
            return problem
        content = reply.content
        arrays = content[self.arrayrecord_key]
        try:
            dense = self.method.decode({k: v.numpy() for k, v in arrays.items()}, self.global_values)
        except ValueError as err:  # e.g. top-k indices out of range
            return str(err)
        same = dense == self.global_values
        self.untouched = same if self.untouched is None else self.untouched & same
        metrics = content[METRICS_KEY]
        ignored = {
            "metric keys": set(metrics) - set(TRAIN_METRICS),
            "array records": set(content.array_records) - {self.arrayrecord_key},
            "metric records": set(content.metric_records) - {METRICS_KEY},
            "config records": set(content.config_records) - {INFO_KEY},
        }
        for what, names in ignored.items():
            self._trim(server_round, reply, what, names)
        reply.content = RecordDict(
            {
                self.arrayrecord_key: ArrayRecord({"values": Array(dense)}),
                METRICS_KEY: MetricRecord({k: metrics[k] for k in TRAIN_METRICS}),
            }
        )
        return None

    def check_reply(self, reply: Message) -> str | None:
        """Why this reply must not be aggregated, or None. The global state never absorbs it."""
        content = reply.content
        arrays = content.array_records.get(self.arrayrecord_key)
        metrics = content.metric_records.get(METRICS_KEY)
        info = content.config_records.get(INFO_KEY)
        if arrays is None or metrics is None or info is None:
            return f"reply lacks '{self.arrayrecord_key}', '{METRICS_KEY}' or '{INFO_KEY}' records"
        if info.get("fingerprint") != self.fingerprint:
            return "fingerprint differs from the server's (another checkpoint or method config)"
        expected = set(self.method.wire_keys)
        if set(arrays) != expected:
            return f"array names {sorted(arrays)} != {sorted(expected)}"
        values = arrays["values"].numpy()
        if values.dtype != np.float32 or values.ndim != 1:
            return f"values have dtype {values.dtype} and {values.ndim} dims, expected 1-D float32"
        if "indices" in arrays:  # only a method that sends indices (top-k) gets here: it checks them
            problem = self.method.check_wire({k: a.numpy() for k, a in arrays.items()})
            if problem:
                return problem
        elif values.size != self.global_values.size:
            return f"values have {values.size} entries, expected {self.global_values.size}"
        if not np.isfinite(values).all():
            return "values contain NaN or Inf"
        missing = [k for k in TRAIN_METRICS if k not in metrics]
        if missing:
            return f"metrics lack {missing}"
        return self._check_metrics(metrics)

    def _check_metrics(self, metrics: MetricRecord) -> str | None:
        """Every metric a finite number; the weight a positive integer below `max_examples`."""
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"metric '{key}' is {value!r}, expected a finite number"
        weight = metrics.get(self.weighted_by_key)
        if weight is None or weight <= 0 or weight != int(weight) or weight > self.max_examples:
            return (
                f"'{self.weighted_by_key}' is {weight!r}, expected a whole number in "
                f"1..{self.max_examples:,} (federation.max_examples)"
            )
        return None

    def _trim(self, server_round: int, reply: Message, what: str, names: set[str]) -> None:
        """Log and record what a reduced reply lost (it is still aggregated)."""
        if names:
            note = f"node {reply.metadata.src_node_id}: ignored {what} {sorted(names)}"
            log.info("round %d: %s", server_round, note)
            self.trimmed.setdefault(server_round, []).append(note)

    def _reject(self, server_round: int, reply: Message, reason: str) -> None:
        node = reply.metadata.src_node_id
        log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
        self.rejected.setdefault(server_round, []).append(f"node {node}: {reason}")

    # --- checkpoints ------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The server optimiser's state (none for FedAvg), saved with every checkpoint."""
        return {}

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no optimiser state, got {sorted(state)}")


class _ExactMean(FedAvg):
    """FedAvg whose mean keeps entries no accepted reply changed bit-exactly at the global value.

    The mean of identical values is that value, but float32 summation can move it by an ulp.
    For top-k that would turn untouched entries into a non-zero pseudo-gradient (which FedAvgM's
    momentum and FedAdam's moments then carry into later rounds) and densify the downlink. The
    fix sits below the server optimiser in the MRO, so FedAvgM and FedAdam see the exact mean.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.untouched is not None:
            values = arrays["values"].numpy().copy()
            values[self.untouched] = self.global_values[self.untouched]
            arrays = ArrayRecord({"values": Array(values)})
        return arrays, metrics


class PackedFedAvg(PackedState, _ExactMean):
    """Weighted FedAvg of the packed vectors."""


class PackedFedAvgM(PackedState, FedAvgM, _ExactMean):
    """FedAvg with server momentum (Hsu et al. 2019) on the packed vectors."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.momentum_vector is None else {"momentum": self.momentum_vector[0]}

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.momentum_vector = [state["momentum"]] if "momentum" in state else None


class PackedFedAdam(PackedState, FedAdam, _ExactMean):
    """FedAdam (Reddi et al. 2021) on the packed vectors."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        if self.m_t is None:
            return {}
        return {"m_t": self.m_t["values"], "v_t": self.v_t["values"]}

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.m_t = {"values": state["m_t"]} if "m_t" in state else None
        self.v_t = {"values": state["v_t"]} if "v_t" in state else None


class PackedFedProx(PackedState, FedProx, _ExactMean):
    """FedProx (Li et al. 2020): FedAvg on the server; each round's config carries `proximal-mu`,
    and the clients add the proximal term to their local loss (`train.train`)."""


STRATEGIES = {
    "fedavg": PackedFedAvg,
    "fedavgm": PackedFedAvgM,
    "fedadam": PackedFedAdam,
    "fedprox": PackedFedProx,
}
