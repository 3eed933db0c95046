"""A SuperNode killed (SIGKILL) between rounds and started again with the same --node-config, on
loopback: it comes back with a new node id while the SuperLink still lists the old one, and its
partition passes to the new node (docs/deployment.md "Node identity", `fedsparse.federation.sampling`)."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness.federation import DEPLOYMENT
from harness.loopback import complete_lines, logged_node_id, running_superlink

from fedsparse.deploy.loopback import flwr_run

pytestmark = pytest.mark.integration

# Seed 4 draws partition 0, then 1, then 0 (one client of two per round). Partition 0 trains in
# round 1; its node is then killed and restarted while partition 1 trains in round 2. The next
# partition-id discovery (when round 2 draws its evaluate clients, or when round 3 starts) meets
# the new node's claim while the SuperLink still lists the dead holder, so the restart rule
# decides, and partition 0 trains on the new node in round 3.
SETTINGS = [  # the loopback deployment's run (harness.federation), one client per round
    *DEPLOYMENT,
    "seed=4",
    "federation.clients_per_round=1",
    "federation.rounds=3",
    "federation.round_timeout=120",
]


def _listed_for(state_db: Path, node_id: int) -> float:
    """Seconds the SuperLink will still list `node_id` without another heartbeat (read-only, from
    Flower 1.41's SQL link state: node ids are stored as signed 64-bit integers)."""
    signed = node_id - 2**64 if node_id >= 2**63 else node_id
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as db:
        (online_until,) = db.execute("SELECT online_until FROM node WHERE node_id = ?", (signed,)).fetchone()
    return online_until - time.time()


def test_a_restarted_supernode_trains_its_partition_again(tmp_path):
    out = tmp_path / "results"
    rounds_file = out / "restart" / "rounds.jsonl"
    with running_superlink(tmp_path, "loopback") as link, ThreadPoolExecutor(1) as pool:
        first = link.supernode("supernode-0", 0, 2)
        link.supernode("supernode-1", 1, 2)
        settings = " ".join([*SETTINGS, f"output_dir={out}", "run_name=restart"])
        run = pool.submit(flwr_run, "loopback", settings, link.env)
        while len(complete_lines(rounds_file)) < 2 and not run.done():  # round 0 (initial state), round 1
            time.sleep(0.2)
        # Kill within 15 s of a heartbeat (they come every 17.5-22.5 s, so this waits 7.5 s at
        # most, early in round 2): the dead node is then listed for 45 s more, past the end of
        # round 2 (~20 s) and so past the next discovery.
        old = logged_node_id(tmp_path / "supernode-0.log")
        while _listed_for(tmp_path / "state.db", old) < 45 and not run.done():
            time.sleep(0.2)
        first.kill()  # SIGKILL: no goodbye to the SuperLink
        first.wait()
        listed = _listed_for(tmp_path / "state.db", old)
        print(f"killed node {old}; the SuperLink lists it for {listed:.0f} s more")
        link.supernode("supernode-0-restarted", 0, 2)
        result = run.result()
    output = result.stdout + result.stderr
    (tmp_path / "flwr-run.log").write_text(output)
    assert result.returncode == 0, output
    rounds = complete_lines(rounds_file)
    assert [r["sampled"] for r in rounds] == [[], [0], [1], [0]], output
    last = rounds[-1]
    assert last["skipped"] is None and last["rejected"] == [] and last["comm"]["up"]["messages"] == 1
    new = logged_node_id(tmp_path / "supernode-0-restarted.log")
    assert new != old  # insecure mode: a fresh key pair, so a new node id
    assert f"node {old} did not report its partition id: Error: Node Unavailable" in output
    assert f"node {old} held partition-id=0 and no longer answers: the id passes to node {new}" in output
