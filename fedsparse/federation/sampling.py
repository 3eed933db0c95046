"""Deterministic client sampling by partition id.

Flower 1.41 samples with the module-global `random.sample` over an unordered list of random
node ids, so two runs with the same seed train different clients. Here every node is first
asked for its stable `partition-id` (one small QUERY message per node), and each round samples
partition ids with a local `random.Random` seeded from (run seed, round, kind) over the sorted
population, then maps them back to node ids. Two runs with the same seed, and two methods under
the same seed, therefore train the same clients in every round.

Node identity (docs/deployment.md, "Node identity"). Nodes are asked once, when first listed. A
SuperNode that restarts comes back with a new node id while the SuperLink still lists the old one
for up to a minute, so a new node can claim a partition id that a listed node holds. Then the
holder is asked again (`probe_timeout`): if it no longer answers, the id passes to the new node (a
restart); if both answer, both are left out of sampling until one of them leaves (a
misconfiguration or an impostor). A reply with an out-of-range or unparsable id, or without its
record, is dropped. Every case is logged and kept in `ClientSampler.notes`; no reply raises.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsparse.federation.protocol import INFO_KEY, PARTITION_KEY

log = logging.getLogger("fedsparse")
KIND_SALT = {"train": 0, "evaluate": 1}


def partition_reply(msg: Message, node_config: dict) -> Message:
    """The ClientApp's answer to the server's query: this node's partition id."""
    if PARTITION_KEY not in node_config:
        raise ValueError("The SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>'.")
    record = ConfigRecord({PARTITION_KEY: int(node_config[PARTITION_KEY])})
    return Message(content=RecordDict({INFO_KEY: record}), reply_to=msg)


class SampledGrid:
    """A view of the grid whose only nodes are this round's sample.

    Flower's FedAvg family samples inside `configure_train`, which FedAvgM and FedAdam extend to
    record the current state; handing them this view (with fraction 1.0) keeps their logic and
    makes the sample ours.
    """

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class ClientSampler:
    """Maps partition ids to node ids and draws each round's clients reproducibly."""

    def __init__(
        self,
        seed: int,
        clients_per_round: int,
        num_clients: int,
        wait_timeout: float = 300.0,
        probe_timeout: float = 60.0,
    ):
        self.seed = int(seed)
        self.clients_per_round = int(clients_per_round)
        self.num_clients = int(num_clients)
        self.wait_timeout = float(wait_timeout)
        # How long a listed node holding a partition id that a new node claims gets to answer
        # again. A dead node's query is answered with an error as soon as the SuperLink drops it
        # (at most 60 s after its last heartbeat), a live one needs a ClientApp process start.
        self.probe_timeout = float(probe_timeout)
        self.node_of: dict[int, int] = {}  # partition id -> node id: the population
        self.conflicts: dict[int, set[int]] = {}  # partition id -> the nodes that all answer for it
        self.left_out: dict[int, str] = {}  # node id -> why; not asked again while it is listed
        self.sampled: dict[tuple[int, str], list[int]] = {}  # (round, kind) -> partition ids
        self.notes: dict[int, list[str]] = {}
        """Round -> why nodes left or rejoined the population in that round: a partition id that
        passed to a restarted node, nodes answering for one id, a dropped reply, a failed query.
        Each is also logged as a warning when it happens."""

    def sample(self, grid: Grid, server_round: int, kind: str = "train") -> SampledGrid:
        """This round's clients as a grid view; their partition ids are kept in `sampled`."""
        population = self._population(grid, server_round)
        rng = random.Random(self.seed * 1_000_003 + server_round * 10 + KIND_SALT[kind])
        chosen = sorted(rng.sample(population, min(self.clients_per_round, len(population))))
        self.sampled[(server_round, kind)] = chosen
        return SampledGrid(grid, [self.node_of[p] for p in chosen])

    def order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by partition id: aggregation sums in the same order in every run."""
        partition_of = {n: p for p, n in self.node_of.items()}
        return sorted(replies, key=lambda m: partition_of.get(m.metadata.src_node_id, self.num_clients))

    def _population(self, grid: Grid, server_round: int) -> list[int]:
        """Sorted partition ids of the connected nodes; waits for all `num_clients` at first.

        At the start every partition id needs exactly one answering node: ids held by nodes
        that conflict, or whose replies were dropped, count as missing, and the `TimeoutError`
        names why (a startup error with the fix, like a node that never connects)."""
        deadline = time.monotonic() + self.wait_timeout
        next_note = 0.0
        while True:
            connected = set(grid.get_node_ids())
            self._forget(connected, server_round)
            known = set(self.node_of.values()) | set(self.left_out) | set().union(*self.conflicts.values())
            self._discover(grid, connected - known, server_round)
            if len(self.node_of) >= self.num_clients or (self.node_of and self.sampled):
                return sorted(self.node_of)
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_clients)) - set(self.node_of))
                why = [self._conflict(p) for p in sorted(self.conflicts)] + list(self.left_out.values())
                raise TimeoutError(
                    f"Only {len(self.node_of)} of federation.num_clients={self.num_clients} "
                    f"SuperNodes connected within {self.wait_timeout:.0f} s (missing partition ids "
                    f"{missing}). Start the missing SuperNodes, or lower federation.num_clients."
                    + (f" Left out: {'; '.join(why)}." if why else "")
                )
            if time.monotonic() >= next_note:
                print(
                    f"waiting for SuperNodes: {len(self.node_of)}/{self.num_clients} connected",
                    flush=True,
                )
                next_note = time.monotonic() + 10
            time.sleep(1)

    def _forget(self, connected: set[int], server_round: int) -> None:
        """Drops the nodes the SuperLink no longer lists; a conflict left with one node ends."""
        self.node_of = {p: n for p, n in self.node_of.items() if n in connected}
        self.left_out = {n: why for n, why in self.left_out.items() if n in connected}
        for p, nodes in list(self.conflicts.items()):
            nodes &= connected
            if len(nodes) > 1:
                continue
            del self.conflicts[p]
            if nodes:
                (self.node_of[p],) = nodes
                self._note(
                    server_round, f"partition-id={p}: the other node left, node {self.node_of[p]} is back"
                )

    def _discover(self, grid: Grid, node_ids: set[int], server_round: int) -> None:
        """Asks new nodes for their partition ids and applies the node identity policy."""
        claims = self._ask(grid, node_ids, self.wait_timeout, server_round)
        holders = {n: p for p, n in self.node_of.items()}
        holders |= {n: p for p, nodes in self.conflicts.items() for n in nodes}
        holders = {n: p for n, p in holders.items() if p in claims.values()}
        answered = self._ask(grid, set(holders), self.probe_timeout, server_round)
        for p in sorted(set(claims.values())):
            new = sorted(n for n, q in claims.items() if q == p)
            nodes = new.copy()
            for n in sorted(n for n, q in holders.items() if q == p):
                if n in answered:
                    nodes.insert(0, n)
                elif n not in self.left_out:  # else dropped by `_ask`, which said why
                    self._leave_out(
                        server_round,
                        n,
                        f"node {n} held partition-id={p} and no longer answers: the id passes to "
                        f"node {new[0] if len(new) == 1 else new} (a restarted SuperNode)",
                    )
            self.node_of.pop(p, None)
            self.conflicts.pop(p, None)
            if len(nodes) == 1:
                self.node_of[p] = nodes[0]
            else:
                self.conflicts[p] = set(nodes)
                self._note(server_round, self._conflict(p))

    def _conflict(self, partition: int) -> str:
        return (
            f"partition-id={partition} is answered by nodes {sorted(self.conflicts[partition])}: all are "
            "left out until only one is listed (a --node-config partition-id given twice, or an impostor)"
        )

    def _ask(self, grid: Grid, node_ids: set[int], timeout: float, server_round: int) -> dict[int, int]:
        """Queries `node_ids`; returns node id -> partition id for the valid answers. A node
        with an invalid answer is left out, a failed query is asked again next round, and a
        node that does not answer within `timeout` is simply absent from the result."""
        if not node_ids:
            return {}
        queries = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in sorted(node_ids)
        ]
        claims = {}
        replies = grid.send_and_receive(queries, timeout=timeout)
        # the SuperLink's own error replies (a node it dropped) come from the SuperLink's node id
        asked = {q.metadata.message_id: q.metadata.dst_node_id for q in queries if q.metadata.message_id}
        for reply in replies:
            node = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                self._note(server_round, f"node {node} did not report its partition id: {reply.error.reason}")
                continue
            partition = self._partition(reply)
            if isinstance(partition, str):
                self._leave_out(server_round, node, f"node {node} dropped: {partition}")
            else:
                claims[node] = partition
        return claims

    def _partition(self, reply: Message) -> int | str:
        """The partition id a query reply reports, or why it is not a valid one."""
        try:
            value = reply.content[INFO_KEY][PARTITION_KEY]
        except (KeyError, TypeError):
            return f"its reply has no {INFO_KEY}/{PARTITION_KEY} record"
        if isinstance(value, bool) or not isinstance(value, int):
            return f"unparsable partition-id {value!r}"
        if not 0 <= value < self.num_clients:
            return (
                f"partition-id={value} is outside 0..{self.num_clients - 1} (federation.num_clients): "
                "fix its --node-config or federation.num_clients"
            )
        return value

    def _leave_out(self, server_round: int, node: int, reason: str) -> None:
        self.left_out[node] = reason
        self._note(server_round, reason)

    def _note(self, server_round: int, reason: str) -> None:
        log.warning("round %d: %s", server_round, reason)
        self.notes.setdefault(server_round, []).append(reason)
