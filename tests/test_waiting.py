"""How long a round waits (fedsparse.federation.waiting): all replies, the round timeout, or the grace
period once the quorum is in, on a grid whose nodes answer at scripted times (real seconds)."""

from __future__ import annotations

import logging
import time

import pytest
from flwr.app import Error, Message, MessageType, RecordDict

from fedsparse.federation.waiting import WaitingGrid, WaitRule

NEVER = float("inf")


class ScriptedGrid:
    """Push/pull like Flower's grids; node n answers `delays[n]` seconds after its message was pushed
    (an error reply where `errors` names it, never for NEVER)."""

    pull_interval = 0.01

    def __init__(
        self,
        delays: dict[int, float],
        errors: frozenset[int] = frozenset(),
        link_errors: frozenset[int] = frozenset(),
    ):
        """`link_errors`: nodes the SuperLink answers for (an error reply whose source is node 1)."""
        self.delays, self.errors, self.link_errors = delays, errors, link_errors
        self.due: dict[str, tuple[float, Message]] = {}
        self.queried = 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = message_id = f"{m.metadata.dst_node_id}-{len(self.due)}"
            node = m.metadata.dst_node_id
            failed = node in self.errors | self.link_errors
            reply = Message(Error(code=0, reason="Node Unavailable") if failed else RecordDict(), reply_to=m)
            if node in self.link_errors:
                reply.metadata.__dict__["_src_node_id"] = 1  # Flower internals: the SuperLink's own reply
            self.due[message_id] = (time.monotonic() + self.delays[node], reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        ready = [i for i in message_ids if i in self.due and self.due[i][0] <= now]
        return [self.due.pop(i)[1] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):
        self.queried += 1
        return []


def _round(grid, rule: WaitRule, timeout: float = 30.0, kind=MessageType.TRAIN):
    missing = {}
    waiting = WaitingGrid(grid, rule, lambda node, reason: missing.setdefault(node, reason))
    messages = [Message(RecordDict(), dst_node_id=n, message_type=kind) for n in grid.delays]
    started = time.monotonic()
    replies = waiting.send_and_receive(messages, timeout=timeout)
    return sorted(r.metadata.src_node_id for r in replies), missing, time.monotonic() - started, waiting


@pytest.fixture(autouse=True)
def _app(app_identity):
    """Messages are built as inside a running app."""


def test_a_round_ends_when_every_node_has_answered():
    grid = ScriptedGrid({1: 0.05, 2: 0.1, 3: 0.15})
    replied, missing, seconds, _ = _round(grid, WaitRule(quorum=1, grace_min=5.0))
    assert replied == [1, 2, 3] and missing == {} and seconds < 1.0


def test_a_dead_node_costs_the_grace_period_not_the_round_timeout():
    grid = ScriptedGrid({1: 0.05, 2: 0.1, 3: NEVER})
    replied, missing, seconds, _ = _round(grid, WaitRule(quorum=2, grace_factor=0.0, grace_min=0.3))
    assert replied == [1, 2] and list(missing) == [3]
    assert 0.4 <= seconds < 1.5  # the last reply at 0.1 s, then 0.3 s without one; the timeout is 30 s
    assert "no reply 0 s after the last one (quorum of 2 reached after 0 s" in missing[3]


def test_a_healthy_node_slower_than_the_quorum_still_counts():
    # quorum at 0.2 s, grace max(0.1, 2 x 0.2) = 0.4 s: a node at 0.55 s (2.75x slower) makes it
    grid = ScriptedGrid({1: 0.2, 2: 0.55})
    replied, missing, _, _ = _round(grid, WaitRule(quorum=1, grace_factor=2.0, grace_min=0.1))
    assert replied == [1, 2] and missing == {}


def test_a_queue_of_clients_served_one_after_another_is_never_cut():
    # a simulation's actors: a reply every 0.2 s, each restarting the 0.3 s grace period
    grid = ScriptedGrid({n: 0.2 * n for n in range(1, 7)})
    replied, missing, _, _ = _round(grid, WaitRule(quorum=1, grace_factor=0.0, grace_min=0.3))
    assert replied == [1, 2, 3, 4, 5, 6] and missing == {}


def test_without_a_quorum_a_round_waits_for_the_round_timeout():
    # error replies (a node the SuperLink reports unavailable) do not make a quorum
    grid = ScriptedGrid({1: 0.05, 2: NEVER}, errors=frozenset({1}))
    replied, missing, seconds, _ = _round(grid, WaitRule(quorum=1, grace_min=0.0), timeout=0.5)
    assert replied == [1] and list(missing) == [2]
    assert seconds >= 0.5 and missing[2] == "no reply within federation.round_timeout=0.5 s"


def test_a_late_reply_is_logged_at_the_next_round_and_ignored(caplog):
    grid = ScriptedGrid({1: 0.05, 2: 0.6})
    rule = WaitRule(quorum=1, grace_factor=0.0, grace_min=0.1)
    replied, missing, _, waiting = _round(grid, rule)
    assert replied == [1] and list(missing) == [2]
    time.sleep(0.6)  # node 2's reply to the ended round arrives
    with caplog.at_level(logging.WARNING, logger="fedsparse.federation.waiting"):
        messages = [Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)]
        replies = waiting.send_and_receive(messages, timeout=30.0)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert "late reply from node 2 arrived after its round had ended: ignored" in caplog.text


def test_queries_keep_the_grids_own_wait():
    grid = ScriptedGrid({1: 0.0})
    _round(grid, WaitRule(), kind=MessageType.QUERY)
    assert grid.queried == 1 and grid.due == {}


def test_an_error_reply_from_the_superlink_is_recorded_against_the_node_it_stands_for():
    grid = ScriptedGrid({7: 0.05, 8: 0.1}, link_errors=frozenset({8}))
    replied, missing, _, _ = _round(grid, WaitRule(quorum=1, grace_min=5.0))
    assert replied == [7] and missing == {8: "the SuperLink answered: Node Unavailable"}
