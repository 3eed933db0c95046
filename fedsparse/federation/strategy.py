"""The packed-vector server strategy on Flower's FedAvg, FedAvgM, FedAdam and FedProx.

`PackedStrategy` wraps any Message-API FedAvg-family strategy. The global state is one dense
float32 vector ("values"); FedAvg, FedAvgM and FedAdam average it unchanged because every
client's update has the same support. Only `topk` changes the wire format (values + int32
indices); its replies are decoded onto the global vector before the base strategy sees them.
Replies are checked by `validation`; bytes are counted on the grid by `accounting`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedsparse.federation import compression, validation
from fedsparse.federation.accounting import CommLedger, MeteredGrid
from fedsparse.federation.compression import rounding_at
from fedsparse.federation.protocol import FINGERPRINT_KEY, INFO_KEY, METRICS_KEY, TRAIN_METRICS
from fedsparse.federation.sampling import ClientSampler
from fedsparse.federation.waiting import WaitingGrid, WaitRule

compression_digest = compression.global_digest
HELD_KEY = "held"  # a train reply's info entry: the hex digest of the global the client received
_DOWN = "downlink-"  # prefix of the downlink's entries among the strategy's checkpointed arrays

if TYPE_CHECKING:  # the strategy calls the method it is given; it never imports torch
    from fedsparse.methods import Method

log = logging.getLogger("fedsparse")


class PackedStrategy:
    """Mixin for a Message-API strategy: encode downlinks, validate and decode uplinks.

    Every reply is reduced to exactly the records and keys Flower's aggregation expects (the
    decoded dense vector and `TRAIN_METRICS`) or dropped with a reason; a round with fewer than
    `min_replies` accepted replies is skipped and leaves the global state as it was. Rounds are
    numbered from `round_offset + 1`, so a resumed run continues the numbering (and with it the
    client sampling and the clients' seeds) of the run it resumes. `start` meters its grid into
    `ledger`.
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
        compression: Mapping | None = None,
        seed: int = 0,
        run_key: str | None = None,
        wait_rule: WaitRule | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.lr_decay = lr_decay  # the clients' learning rate is multiplied by this every round
        self.method = method
        self.ledger = ledger
        self.sampler = sampler
        self.min_replies = min_replies
        self.wait_rule = wait_rule or WaitRule(quorum=min_replies)  # when a round stops waiting
        self.max_examples = max_examples  # a larger `num-examples` would dominate the average
        self.max_reply_bytes = 8 * method.num_values() + 2**20  # values + indices + generous framing
        # compressed uplink: (bits, block) every reply must use, or None
        on = compression is not None and compression.get("enabled", False)
        self.compression = (int(compression["bits"]), int(compression["block"])) if on else None
        self._decompressed: dict[int, ArrayRecord] = {}  # id -> record, this round's decoded replies
        # compressed downlink: (bits, block, rounding) of the delta the server broadcasts, or None
        down = int((compression or {}).get("downlink_bits", 0) or 0)
        self.downlink = (down, int(compression["block"]), rounding_at(compression, down)) if down else None
        # server-side error feedback: what the downlink's rounding lost, added to the next change
        self.downlink_ef = bool(down and compression.get("downlink_error_feedback", False))
        self.downlink_residual: np.ndarray | None = None
        self.seed = int(seed)
        self.run_key = run_key  # names the clients' node-local stores (apps.client_state)
        self.initial_digest = compression_digest(method.initial_state()) if down else b""
        self.held: dict[int, bytes] = {}  # node -> digest of the global it last reported holding
        # (digest of the previous global, its delta's wire array, digest of the global it makes)
        self.pending: tuple[bytes, np.ndarray, bytes] | None = None
        self.round_offset = 0
        self.current_round = 0  # the round being configured, counting resumed ones
        self.fingerprint = method.fingerprint()
        self.global_values: np.ndarray | None = None
        self.accepted: dict[int, int] = {}
        self.rejected: dict[int, list[str]] = {}
        self.trimmed: dict[int, list[str]] = {}
        self.skipped: dict[int, str] = {}
        self.train_metrics: dict[int, MetricRecord] = {}
        self.untouched: np.ndarray | None = None
        self.client_eval: dict[int, MetricRecord] = {}

    def metered(self, grid: Grid, waiting: bool = True) -> MeteredGrid:
        """`grid` with every message measured into the ledger under the current round; `waiting`:
        train and evaluate rounds end by `wait_rule` (a SecAgg+ runner keeps the grid's own wait)."""
        if waiting:
            grid = WaitingGrid(grid, self.wait_rule, self._no_reply)
        return MeteredGrid(grid, self.ledger, lambda: self.current_round)

    def _no_reply(self, node: int, reason: str) -> None:
        self.reject(self.current_round, node, reason)

    def start(self, grid: Grid, *args, **kwargs):
        return super().start(self.metered(grid), *args, **kwargs)

    def _send(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        messages = list(messages)
        self.global_values = arrays["values"].numpy()
        full = ArrayRecord({k: Array(v) for k, v in self.method.encode(self.global_values).items()})
        for message in messages:
            if not self.downlink:
                message.content[self.arrayrecord_key] = full
                continue
            # the base strategy's messages share one content: each node gets its own
            message.content = RecordDict(dict(message.content.items()))
            message.content[self.arrayrecord_key] = self._downlink(message.metadata.dst_node_id) or full
            if self.run_key is not None:
                message.content["config"]["run-key"] = self.run_key
        return messages

    def _downlink(self, node: int) -> ArrayRecord | None:
        """What `node` needs to rebuild the global exactly: only the global's digest when it reported
        holding it (every node holds the initial global implicitly), the digest of the previous
        global and the delta when it reported holding that one, else None (the full vector)."""
        now = compression_digest(self.global_values)
        held = self.held.get(node, self.initial_digest)
        base = np.frombuffer(held, np.uint8).copy()
        if held == now:
            return ArrayRecord({compression.BASE_KEY: Array(base)})
        if self.pending is not None and self.pending[0] == held and self.pending[2] == now:
            return ArrayRecord({compression.BASE_KEY: Array(base), compression.KEY: Array(self.pending[1])})
        return None

    def record_held(self, reply: Message) -> None:
        """Note which global a replying node holds (from its train reply), or that it holds nothing
        usable (an error reply): it gets the full vector until it reports a global again."""
        node = reply.metadata.src_node_id
        info = None if reply.has_error() else reply.content.config_records.get(INFO_KEY)
        try:
            self.held[node] = bytes.fromhex(str(info[HELD_KEY]))
        except (TypeError, KeyError, ValueError):
            self.held[node] = b""

    def quantise_global(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The new global the clients can rebuild exactly: the previous global plus the quantised,
        dequantised change (rounding drawn from (seed, round)) with, under downlink error feedback,
        what earlier rounds' rounding left out; FedAvgM's own copy follows it."""
        bits, block, rounding = self.downlink
        previous = self.global_values
        delta = arrays["values"].numpy().astype(np.float32) - previous
        if self.downlink_ef and self.downlink_residual is not None:
            delta += self.downlink_residual
        rng = compression.downlink_rng(self.seed, server_round)
        wire = compression.encode(delta, bits, block, rng, rounding)
        values = compression.apply_delta(previous, wire, bits, block)
        if self.downlink_ef:  # the aggregate not yet broadcast: carried into the next round's change
            self.downlink_residual = delta - (values - previous)
        self.pending = (compression_digest(previous), wire, compression_digest(values))
        arrays = ArrayRecord({"values": Array(values)})
        if isinstance(getattr(self, "current_arrays", None), ArrayRecord):  # FedAvgM's global
            self.current_arrays = arrays
        return arrays

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        server_round = self.current_round = server_round + self.round_offset
        self._decompressed.clear()
        config = ConfigRecord(dict(config))  # the caller passes the same record every round
        config["lr"] = float(config["lr"]) * self.lr_decay ** (server_round - 1)
        config[FINGERPRINT_KEY] = self.fingerprint
        grid = self.sampler.sample(grid, server_round, "train")
        return self._send(super().configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        server_round = self.current_round = server_round + self.round_offset
        config[FINGERPRINT_KEY] = self.fingerprint
        grid = self.sampler.sample(grid, server_round, "evaluate")
        return self._send(super().configure_evaluate(server_round, arrays, config, grid), arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = []
        self.untouched = None  # entries every accepted reply left exactly at the global value
        for reply in self.sampler.order(replies):
            if self.downlink:
                self.record_held(reply)
            if reply.has_error():
                problem = f"client error: {reply.error.reason}"
            else:
                problem = self.train_reply_problem(reply) or self._reduce(server_round, reply)
            if problem:
                self.reject(server_round, reply.metadata.src_node_id, problem)
            else:
                accepted.append(reply)
        self.accepted[server_round] = len(accepted)
        if not self.has_quorum(server_round, len(accepted)):
            return None, None
        return self._aggregate(server_round, accepted)

    def aggregate_mean(
        self, server_round: int, values: np.ndarray, metrics: dict
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the mean of clients already checked one by one (SecAgg+): `values` is their
        weighted mean, `metrics` their `TRAIN_METRICS` with the total weight."""
        server_round += self.round_offset
        self.untouched = None
        arrays = ArrayRecord({"values": Array(values)})
        problem = validation.arrays_problem(arrays, self.method, self.global_values.size)
        reply = Message(
            content=RecordDict({self.arrayrecord_key: arrays, METRICS_KEY: MetricRecord(metrics)}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        problem = problem or self._reduce(server_round, reply)
        if problem:
            self.skip(server_round, f"the secure mean is unusable: {problem}")
            return None, None
        return self._aggregate(server_round, [reply])

    def _aggregate(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.downlink:
            arrays = self.quantise_global(server_round, arrays)
        if metrics is not None:
            self.train_metrics[server_round] = metrics
        return arrays, metrics

    def has_quorum(self, server_round: int, accepted: int) -> bool:
        """Whether `accepted` valid replies make the round; else it is recorded as skipped."""
        if accepted < self.min_replies:
            self.skip(
                server_round,
                f"{accepted} accepted replies < federation.min_replies={self.min_replies}; "
                "the global state is unchanged",
            )
        return accepted >= self.min_replies

    def skip(self, server_round: int, reason: str) -> None:
        self.skipped[server_round] = reason
        log.warning("round %d skipped: %s", server_round, reason)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        accepted = []
        for reply in self.sampler.order(replies):
            if reply.has_error():
                problem = f"client error in evaluation: {reply.error.reason}"
            elif METRICS_KEY not in reply.content.metric_records:
                problem = "evaluation: reply lacks its metrics record"
            else:
                problem = validation.metrics_problem(reply.content[METRICS_KEY], self.max_examples)
                problem = problem and f"evaluation: {problem}"
            if problem:
                self.reject(server_round, reply.metadata.src_node_id, problem)
            else:
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

    def train_reply_problem(self, reply: Message) -> str | None:
        """Why this clear-text train reply must not be aggregated, or None. A compressed reply is
        first decoded in place into the values the method would have sent (`decompress`)."""
        problem = self.decompress(reply)
        if problem:
            return problem
        return validation.train_reply_problem(
            reply.content,
            arrays_key=self.arrayrecord_key,
            fingerprint=self.fingerprint,
            method=self.method,
            size=self.global_values.size,
            max_examples=self.max_examples,
            max_bytes=self.max_reply_bytes,
        )

    def decompress(self, reply: Message) -> str | None:
        """With compression on, replace a reply's `compressed` update by the values it stands for
        (the received global's entries plus the dequantised update), so that validation, DP's
        clipping and noise and the base strategy's mean all see the dequantised vector; or say
        why it cannot be decoded. Idempotent within a round (DP's wrapper checks replies first)."""
        arrays = reply.content.array_records.get(self.arrayrecord_key)
        if self.compression is None or arrays is None or id(arrays) in self._decompressed:
            return None
        problem = validation.payload_problem(reply.content, self.max_reply_bytes)
        problem = problem or validation.compressed_problem(arrays, self.method)
        if problem:
            return problem
        wire = {k: a.numpy() for k, a in arrays.items()}
        bits, block = self.compression
        try:
            update = compression.decode(wire.pop(compression.KEY), self.method.num_values(), bits, block)
            values = self.method.wire_reference(wire, self.global_values) + update
        except ValueError as err:
            return str(err)
        decoded = ArrayRecord({k: Array(v) for k, v in wire.items()} | {"values": Array(values)})
        reply.content[self.arrayrecord_key] = decoded
        self._decompressed[id(decoded)] = decoded
        return None

    def _reduce(self, server_round: int, reply: Message) -> str | None:
        """Replace a valid reply's content by exactly what the aggregation reads (the dense vector
        and `TRAIN_METRICS`), or say why it cannot be decoded."""
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

    def _trim(self, server_round: int, reply: Message, what: str, names: set[str]) -> None:
        """Log and record what a reduced reply lost (it is still aggregated)."""
        if names:
            note = f"node {reply.metadata.src_node_id}: ignored {what} {sorted(names)}"
            log.info("round %d: %s", server_round, note)
            self.trimmed.setdefault(server_round, []).append(note)

    def reject(self, server_round: int, node: int, reason: str) -> None:
        """Log and record a reply that is not aggregated."""
        log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
        self.rejected.setdefault(server_round, []).append(f"node {node}: {reason}")

    # --- checkpoints ------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The server optimiser's state and the downlink's (the last delta, which global each node
        reported holding, the error-feedback residual), saved with every checkpoint."""
        state = self.optimiser_state()
        if self.downlink and self.pending is not None:
            base, wire, result = self.pending
            state[f"{_DOWN}pending"] = np.frombuffer(base + result, np.uint8).copy()
            state[f"{_DOWN}delta"] = wire
        if self.downlink_residual is not None:
            state[f"{_DOWN}residual"] = self.downlink_residual
        if self.downlink and self.held:
            nodes = sorted(self.held)
            state[f"{_DOWN}nodes"] = np.array(nodes, np.uint64)
            state[f"{_DOWN}held"] = np.array(
                [list(self.held[n].ljust(compression.DIGEST_BYTES, b"\0")) for n in nodes], np.uint8
            )
        return state

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        down = {k[len(_DOWN) :]: v for k, v in state.items() if k.startswith(_DOWN)}
        self.load_optimiser_state({k: v for k, v in state.items() if not k.startswith(_DOWN)})
        if "pending" in down:
            digests = down["pending"].tobytes()
            self.pending = (
                digests[: compression.DIGEST_BYTES],
                down["delta"],
                digests[compression.DIGEST_BYTES :],
            )
        if "residual" in down:
            if not self.downlink_ef:
                raise ValueError(
                    "the checkpoint holds a downlink error-feedback residual but this run has "
                    "compression.downlink_error_feedback=false: resume with the run's own config"
                )
            self.downlink_residual = np.asarray(down["residual"], np.float32)
        if "nodes" in down:
            self.held = {
                int(n): bytes(h) if any(h) else b"" for n, h in zip(down["nodes"], down["held"], strict=True)
            }

    def optimiser_state(self) -> dict[str, np.ndarray]:
        """The server optimiser's state (none for FedAvg)."""
        return {}

    def load_optimiser_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no optimiser state, got {sorted(state)}")


class _FedAvgKeepingUntouched(FedAvg):
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


class PackedFedAvg(PackedStrategy, _FedAvgKeepingUntouched):
    """Weighted FedAvg of the packed vectors."""


class PackedFedAvgM(PackedStrategy, FedAvgM, _FedAvgKeepingUntouched):
    """FedAvg with server momentum (Hsu et al. 2019) on the packed vectors."""

    def optimiser_state(self) -> dict[str, np.ndarray]:
        return {} if self.momentum_vector is None else {"momentum": self.momentum_vector[0]}

    def load_optimiser_state(self, state: dict[str, np.ndarray]) -> None:
        self.momentum_vector = [state["momentum"]] if "momentum" in state else None


class PackedFedAdam(PackedStrategy, FedAdam, _FedAvgKeepingUntouched):
    """FedAdam (Reddi et al. 2021) on the packed vectors."""

    def optimiser_state(self) -> dict[str, np.ndarray]:
        if self.m_t is None:
            return {}
        return {"m_t": self.m_t["values"], "v_t": self.v_t["values"]}

    def load_optimiser_state(self, state: dict[str, np.ndarray]) -> None:
        self.m_t = {"values": state["m_t"]} if "m_t" in state else None
        self.v_t = {"values": state["v_t"]} if "v_t" in state else None


class PackedFedProx(PackedStrategy, FedProx, _FedAvgKeepingUntouched):
    """FedProx (Li et al. 2020): FedAvg on the server; each round's config carries `proximal-mu`,
    and the clients add the proximal term to their local loss (`train.train`)."""


STRATEGIES = {
    "fedavg": PackedFedAvg,
    "fedavgm": PackedFedAvgM,
    "fedadam": PackedFedAdam,
    "fedprox": PackedFedProx,
}
