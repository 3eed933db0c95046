"""How long a round waits for its replies: until every node has answered, until
`federation.round_timeout`, or once the quorum is in, until replies stop coming for a grace period.

The rule (docs/deployment.md, Faults): once `quorum` replies without error have arrived
(`federation.min_replies`), the round ends as soon as no reply has arrived for
`max(grace_min, grace_factor x the time the quorum took)` seconds. A node that died (or hangs)
then costs its round that grace period, not the round timeout, while a healthy node that is
slower than the fastest ones still counts: with deployed nodes training in parallel, a node up to
`1 + grace_factor` times slower than the quorum's last one makes it; in a simulation, where a few
actors serve the clients one after another, each reply restarts the period, so a queue of
healthy clients is never cut. Nodes that did not answer, and those the SuperLink answered
for (`Node Unavailable`, with the SuperLink as the source), are reported to `on_missing` with the
reason; a reply that arrives later, up to the end of the next round's wait, is logged and ignored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

WAITED = (MessageType.TRAIN, MessageType.EVALUATE)  # queries and SecAgg+ stages keep the grid's own wait


@dataclass(frozen=True)
class WaitRule:
    """When a round stops waiting once its quorum is in (see the module doc)."""

    quorum: int = 1
    grace_factor: float = 2.0
    grace_min: float = 60.0

    def grace(self, quorum_seconds: float) -> float:
        """Seconds without a new reply after which a round that has its quorum ends."""
        return max(self.grace_min, self.grace_factor * quorum_seconds)


class WaitingGrid:
    """`grid` whose train and evaluate rounds end by `rule`; each node that did not answer is passed
    to `on_missing(node, reason)`, and late replies of the previous round are logged and dropped."""

    def __init__(self, grid: Grid, rule: WaitRule, on_missing: Callable[[int, str], None]):
        self._grid = grid
        self._rule = rule
        self._on_missing = on_missing
        self._late: dict[str, int] = {}  # message id -> node: the previous round's unanswered messages
        # the grid's own polling cadence where it declares one (the in-memory grid: 0.1 s)
        self._poll = float(getattr(grid, "pull_interval", 1.0))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not hasattr(self._grid, "push_messages") or not any(
            m.metadata.message_type in WAITED for m in messages
        ):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        late, self._late = self._late, {}
        started = time.monotonic()
        pushed = {i for i in self._grid.push_messages(messages) if i}
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for message_id in set(node_of) - pushed:
            self._on_missing(node_of.pop(message_id), "the message could not be pushed to the SuperLink")
        pending, replies = set(node_of), []
        hard = started + timeout if timeout is not None else math.inf
        quorum_at = last = None
        while pending:
            got = list(self._grid.pull_messages(pending | set(late)))
            now = time.monotonic()
            for reply in got:
                if reply.metadata.reply_to_message_id in late:
                    _log_late(reply, late.pop(reply.metadata.reply_to_message_id))
                    continue
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                last = now
                if reply.has_error() and reply.metadata.src_node_id != node_of.get(message_id):
                    # the SuperLink's own error reply (e.g. Node Unavailable) names the SuperLink as
                    # its source: record it against the node it stands for
                    self._on_missing(node_of[message_id], f"the SuperLink answered: {reply.error.reason}")
                    continue
                replies.append(reply)
            if quorum_at is None and sum(not r.has_error() for r in replies) >= self._rule.quorum:
                quorum_at = now
            end = hard if quorum_at is None else min(hard, last + self._rule.grace(quorum_at - started))
            if not pending or now >= end:
                break
            time.sleep(min(self._poll, end - now))
        for message_id in pending:
            self._late[message_id] = node_of[message_id]
            if quorum_at is None or time.monotonic() >= hard:
                reason = f"no reply within federation.round_timeout={timeout:g} s"
            else:
                grace = self._rule.grace(quorum_at - started)
                reason = (
                    f"no reply {grace:.0f} s after the last one (quorum of {self._rule.quorum} reached "
                    f"after {quorum_at - started:.0f} s; federation.grace_min/grace_factor)"
                )
            self._on_missing(node_of[message_id], reason)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _log_late(reply: Message, node: int) -> None:
    what = f"error ({reply.error.reason})" if reply.has_error() else "reply"
    log.warning("late %s from node %d arrived after its round had ended: ignored", what, node)
