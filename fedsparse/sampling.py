"""Deterministic client sampling by partition id.

Flower 1.41 samples with the module-global `random.sample` over an unordered list of random
node ids, so two runs with the same seed train different clients. Here every node is first
asked for its stable `partition-id` (one small QUERY message per node), and each round samples
partition ids with a local `random.Random` seeded from (run seed, round, kind) over the sorted
population, then maps them back to node ids. Two runs with the same seed, and two methods under
the same seed, therefore train the same clients in every round.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsparse.protocol import INFO_KEY, PARTITION_KEY

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
    ):
        self.seed = int(seed)
        self.clients_per_round = int(clients_per_round)
        self.num_clients = int(num_clients)
        self.wait_timeout = float(wait_timeout)
        # (round, "down"|"up", message) for each query message: the strategy counts its bytes
        self.on_message: Callable[[int, str, Message], None] | None = None
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.sampled: dict[tuple[int, str], list[int]] = {}  # (round, kind) -> partition ids

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
        """Sorted partition ids of the connected nodes; waits for all `num_clients` at first."""
        deadline = time.monotonic() + self.wait_timeout
        next_note = 0.0
        while True:
            connected = set(grid.get_node_ids())
            self.node_of = {p: n for p, n in self.node_of.items() if n in connected}
            self._discover(grid, connected - set(self.node_of.values()), server_round)
            if len(self.node_of) >= self.num_clients or (self.node_of and self.sampled):
                return sorted(self.node_of)
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_clients)) - set(self.node_of))
                raise TimeoutError(
                    f"Only {len(self.node_of)} of federation.num_clients={self.num_clients} "
                    f"SuperNodes connected within {self.wait_timeout:.0f} s (missing partition ids "
                    f"{missing}). Start the missing SuperNodes, or lower federation.num_clients."
                )
            if time.monotonic() >= next_note:
                print(
                    f"waiting for SuperNodes: {len(self.node_of)}/{self.num_clients} connected",
                    flush=True,
                )
                next_note = time.monotonic() + 10
            time.sleep(1)

    def _discover(self, grid: Grid, node_ids: set[int], server_round: int) -> None:
        if not node_ids:
            return
        queries = [
            Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
            for n in sorted(node_ids)
        ]
        for q in queries:
            self._count(server_round, "down", q)
        for reply in grid.send_and_receive(queries, timeout=self.wait_timeout):
            if reply.has_error():
                log.warning(
                    "node %d did not report its partition id: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            self._count(server_round, "up", reply)
            partition = int(reply.content[INFO_KEY][PARTITION_KEY])
            node = reply.metadata.src_node_id
            if not 0 <= partition < self.num_clients:
                raise ValueError(
                    f"A SuperNode reports partition-id={partition}, outside 0..{self.num_clients - 1} "
                    "(federation.num_clients): fix its --node-config or federation.num_clients."
                )
            if partition in self.node_of and self.node_of[partition] != node:
                raise ValueError(
                    f"Two SuperNodes report partition-id={partition}: give each node its own "
                    "--node-config partition-id."
                )
            self.node_of[partition] = node

    def _count(self, server_round: int, direction: str, message: Message) -> None:
        if self.on_message is not None:
            self.on_message(server_round, direction, message)
