"""The tests' loopback deployment (a real SuperLink and SuperNodes, fedsparse.deploy.loopback) of
the tiny federation, and the checks on what it ran: the same run as a simulation of the same seed,
socket bytes within the accounted bytes plus Flower's overhead, set-up paid per message."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.cli.build import build_fab_from_disk

from fedsparse.deploy.loopback import (
    ROOT,
    Deployment,
    deploy,
    flower_env,
    free_port,
    leftovers,
    processes,
    superlink_argv,
    supernode_argv,
    wait_for_port,
    write_connection,
)
from fedsparse.deploy.relay import DOWN, UP
from fedsparse.report.results import read_run
from harness.federation import DEPLOYMENT


def deploy_tiny(
    work: Path, tls: Path | None = None, rounds: int = 2, extra: tuple[str, ...] = (), nodes: int = 2
) -> Deployment:
    """`rounds` rounds of the DEPLOYMENT run (with `extra` overrides; another `method=` drops
    PaFi's density) on a SuperLink and `nodes` SuperNodes; checks that it finished and, with
    `tls`, that the SuperLink refused a plaintext client."""
    other_method = any(e.startswith("method=") for e in extra)
    settings = [o for o in DEPLOYMENT if not (other_method and o.startswith("method."))]
    done = deploy(work, [*settings, f"federation.rounds={rounds}", *extra], tls=tls, nodes=nodes)
    assert done.run.returncode == 0, done.run.stdout + done.run.stderr
    assert f"[round {rounds}/{rounds}]" in done.run.stdout  # per-round progress is streamed back
    if tls:
        assert done.plaintext is not None and done.plaintext.returncode != 0
    return done


def complete_lines(path: Path) -> list[dict]:
    """The complete JSON lines a running server has written so far (e.g. rounds.jsonl)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def until_round_2_reached(node_log: Callable[[], str], run: Future) -> None:
    """Wait until a SuperNode has pulled its second train message (round 2's, in a run that samples
    it every round), or the run ended; `node_log` returns the node's log so far."""
    while node_log().count("Receiving: train message") < 2 and not run.done():
        time.sleep(0.2)


def node_ids(log: str) -> list[int]:
    """The node ids a SuperNode's log text shows, one per time it connected."""
    return [int(i) for i in re.findall(r"SuperNode ID: (\d+)", log)]


def logged_node_id(log: Path) -> int:
    """The node id a SuperNode logged when it connected."""
    return node_ids(log.read_text())[0]


def assert_the_killed_node_rejoined(run_dir: Path, dead: int, new: int) -> float:
    """A KILLED_SETTINGS run where partition 2's node (id `dead`) was killed early in round 2 and
    came back as node `new`: round 2 aggregated the two healthy replies within a bounded wait and
    recorded the dead node, round 3 trained all three. Returns round 2's wall seconds."""
    _, rounds, summary = read_run(run_dir)
    second, third = rounds[2], rounds[3]
    cost = second["wall_seconds"] - rounds[1]["wall_seconds"]
    # round 2: the two healthy replies are aggregated, the dead node is recorded with why
    assert second["sampled"] == [0, 1, 2] and second["skipped"] is None
    assert second["comm"]["down"]["messages"] == 3 and second["comm"]["up"]["messages"] == 2
    assert len(second["rejected"]) == 1 and second["rejected"][0].startswith(f"node {dead}: "), second
    assert "no reply" in second["rejected"][0] or "Node Unavailable" in second["rejected"][0]
    assert cost < 120  # bounded by the grace period (or Flower's offline detection), not round_timeout=600
    assert second["dev"] != rounds[1]["dev"]  # the global moved
    # round 3: the restarted node holds partition 2 and trains; nothing else is lost
    assert third["sampled"] == [0, 1, 2] and third["skipped"] is None and third["rejected"] == []
    assert third["comm"]["up"]["messages"] == 3
    assert new in third["comm"]["clients"] and dead not in third["comm"]["clients"], third["comm"]
    assert summary["finished"] and summary["rounds_done"] == 3 and summary["skipped_rounds"] == []
    return cost


@dataclass
class SuperLink:
    """A running SuperLink: `connection` in FLWR_HOME `home` points at `port`; `start(name, argv,
    env)` starts more processes that are stopped with it."""

    home: Path
    port: int
    env: dict[str, str]
    start: Callable[..., subprocess.Popen]
    process: subprocess.Popen

    def supernode(self, name: str, partition: int, partitions: int) -> subprocess.Popen:
        """A plaintext SuperNode for `partition` of `partitions`, logging to `<name>.log`."""
        return self.start(name, supernode_argv(self.port, partition, partitions), self.env)


@contextmanager
def running_superlink(work: Path, connection: str, simulation: bool = False) -> Iterator[SuperLink]:
    """A plaintext SuperLink on 127.0.0.1 (`simulation`: it runs the federation in its own
    simulation engine) with its state under `work`; afterwards nothing it started is left."""
    home, port = work / "flwr-home", free_port()
    write_connection(home, connection, port)
    env = flower_env(home)
    with processes(work, home) as start:
        link = start(
            "superlink",
            superlink_argv(port, None if simulation else work / "state.db", simulation=simulation),
            env,
        )
        wait_for_port(port, link)
        yield SuperLink(home, port, env, start, link)
    assert link.poll() is not None and leftovers(home) == []


def assert_matches_simulation(deployed: Path, simulated: Path) -> None:
    _, d_rounds, d_summary = read_run(deployed)
    _, s_rounds, s_summary = read_run(simulated)
    assert len(d_rounds) == len(s_rounds) == 3
    assert d_summary["fingerprint"] == s_summary["fingerprint"]
    for d, s in zip(d_rounds[1:], s_rounds[1:]):
        for direction in ("down", "up"):
            dc, sc = d["comm"][direction], s["comm"][direction]
            assert dc["messages"] == sc["messages"] == 2
            assert (dc["values"], dc["head"], dc["indices"]) == (sc["values"], sc["head"], sc["indices"])
            # only message metadata differs (ids a deployment fills in); payloads are identical
            assert abs(dc["bytes"] - sc["bytes"]) <= 512
        # same seed, same shards, same local steps: the same model up to summation order
        np.testing.assert_allclose(d["dev"]["loss"], s["dev"]["loss"], atol=1e-4)
        np.testing.assert_allclose(d["train"]["train-loss"], s["train"]["train-loss"], atol=1e-4)


# What the SuperNode <-> SuperLink sockets carry beyond the ledger's message bytes (measured by
# parsing the plaintext stream per endpoint, docs/deployment.md "Socket bytes"): every HTTP/1.1
# request costs ~850 B of headers up (the node-auth public key and signature ride on each one) and
# ~130 B down, plus small protobuf bodies; each message is ~7 requests (pull-messages, get-run,
# pull-object per object, confirm; push-messages, push-object per object); an idle node polls every
# 3 s and heartbeats; each node fetches the FAB once, in round 1. The SuperLink (uvicorn) closes
# connections idle for 5 s, so nodes reconnect every round; with TLS each new connection costs a
# handshake (measured ~2 KB down, ~0.7 KB up) and every record ~22 B.
PER_REQUEST = {UP: 1024, DOWN: 384}
REQUESTS_PER_MESSAGE = 10
REQUESTS_PER_NODE_SECOND = 0.5
PER_CONNECTION = 4096


def assert_socket_bytes(run_dir: Path, socket: list[dict[str, int]], nodes: int = 2) -> None:
    """Per round and direction: accounted <= socket <= 1.01 accounted + FAB + the overhead above."""
    _, records, _ = read_run(run_dir)
    assert len(socket) == len(records) + 1
    fab = nodes * len(build_fab_from_disk(ROOT))
    for prev, record, sock in zip(records, records[1:], socket[1:]):
        comm, seconds = record["comm"], record["wall_seconds"] - prev["wall_seconds"]
        messages = sum(comm[k]["messages"] for k in ("down", "up", "eval_down", "eval_up"))
        requests = REQUESTS_PER_MESSAGE * messages + REQUESTS_PER_NODE_SECOND * nodes * seconds
        for d in (UP, DOWN):
            acc = comm[d]["bytes"] + comm[f"eval_{d}"]["bytes"]
            bound = 1.01 * acc + PER_REQUEST[d] * requests + PER_CONNECTION * sock["connections"]
            bound += fab if record["round"] == 1 and d == DOWN else 0
            print(f"round {record['round']} {d}: accounted {acc:,} socket {sock[d]:,} bound {bound:,.0f}")
            assert acc <= sock[d] <= bound


def assert_setup_paid_per_message(deployed: Path, simulated: Path) -> None:
    """Per-message overhead (message arrival, i.e. the ClientApp process start, to the first
    training step): a deployment pays it on every message, a simulation actor only on its first."""
    for d, s in zip(read_run(deployed)[1][1:], read_run(simulated)[1][1:]):
        setup, train = d["train"]["setup-seconds"], d["train"]["train-seconds"]
        print(f"round {d['round']}: per-message overhead {setup:.1f} s, local training {train:.1f} s")
        assert setup > 0 and s["train"]["setup-seconds"] >= 0
    assert d["train"]["setup-seconds"] > s["train"]["setup-seconds"]  # the last round: actors are warm
