"""Faults in a loopback deployment (a real SuperLink, SuperNodes and `flwr run` on 127.0.0.1):
what the federation refuses, survives or reports."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from harness.federation import DEPLOYMENT, KILLED_SETTINGS
from harness.loopback import (
    assert_the_killed_node_rejoined,
    complete_lines,
    logged_node_id,
    running_superlink,
    until_round_2_reached,
)

from fedsparse.deploy.loopback import (
    ROOT,
    deploy,
    flower_env,
    flwr_run,
    free_port,
    leftovers,
    processes,
    register_supernode,
    started_with,
    superlink_argv,
    supernode_argv,
    wait_for_port,
    write_connection,
)
from fedsparse.deploy.relay import DOWN, UP, Faults
from fedsparse.federation import checkpoint
from fedsparse.report.results import read_run

pytestmark = pytest.mark.integration


# --- A SuperNode killed mid-round comes back (issue 27, item 1) -----------------------------------
# Three SuperNodes, all sampled, quorum 2. Partition 2's node is killed (SIGKILL) early in round 2
# and started again at once with the same --node-config: round 2 ends a grace period after the two
# healthy replies (federation/waiting.py; grace_min 5 s here, 60 s by default) instead of at
# round_timeout, records the dead node, aggregates the two replies; the restarted node (a new node
# id: insecure mode) takes partition 2 over and trains in round 3.


def test_a_supernode_killed_mid_round_costs_a_grace_period_and_rejoins(tmp_path):
    out = tmp_path / "results"
    with running_superlink(tmp_path, "loopback") as link, ThreadPoolExecutor(1) as pool:
        nodes = [link.supernode(f"supernode-{p}", p, 3) for p in range(3)]
        settings = " ".join([*KILLED_SETTINGS, f"output_dir={out}", "run_name=killed"])
        run = pool.submit(flwr_run, "loopback", settings, link.env, timeout=500)
        until_round_2_reached((tmp_path / "supernode-2.log").read_text, run)
        nodes[2].kill()  # SIGKILL: no goodbye to the SuperLink
        nodes[2].wait()
        killed_at = time.monotonic()
        dead = logged_node_id(tmp_path / "supernode-2.log")
        link.supernode("supernode-2-restarted", 2, 3)
        result = run.result()
        finished_after = time.monotonic() - killed_at
    output = result.stdout + result.stderr
    (tmp_path / "flwr-run.log").write_text(output)
    assert result.returncode == 0 and "Traceback" not in output, output
    new = logged_node_id(tmp_path / "supernode-2-restarted.log")
    cost = assert_the_killed_node_rejoined(out / "killed", dead, new)
    # it came back while the SuperLink still listed the dead node: partition 2 was handed over
    _, rounds, _ = read_run(out / "killed")
    assert any(f"passes to node {new}" in note for r in rounds for note in r["node_notes"]), rounds
    print(f"killed node {dead} (new id {new}); round 2 took {cost:.0f} s, the rest {finished_after:.0f} s")


# --- The ServerApp killed mid-run is resumed (issue 27, item 2) ----------------------------------
# The DEPLOYMENT run (2 rounds, the `simulated` fixture's config): its ServerApp process is killed
# (SIGKILL) during round 2, and `flwr run` with the same overrides plus `resume=<run dir>` finishes
# it from the round-1 checkpoint on the same SuperLink and SuperNodes.


def _serverapps(home: Path) -> list[psutil.Process]:
    """The `flwr-serverapp` processes the SuperLink started for this FLWR_HOME."""
    found = []
    for proc in started_with(home):
        try:
            if "flwr-serverapp" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # it ended meanwhile
            continue
    return found


def test_a_killed_serverapp_is_resumed_with_flwr_run_to_the_uninterrupted_final_state(
    tmp_path, loopback_deployment, simulated
):
    out = tmp_path / "results"
    run_dir = out / "served"
    settings = [*DEPLOYMENT, "federation.rounds=2", f"output_dir={out}", "run_name=served"]
    with running_superlink(tmp_path, "loopback") as link, ThreadPoolExecutor(1) as pool:
        for partition in range(2):
            link.supernode(f"supernode-{partition}", partition, 2)
        first = pool.submit(flwr_run, "loopback", " ".join(settings), link.env)
        while len(complete_lines(run_dir / "rounds.jsonl")) < 2 and not first.done():  # rounds 0, 1
            time.sleep(0.2)
        killed = _serverapps(link.home)
        for proc in killed:
            proc.kill()
        interrupted = first.result()
        assert len(killed) == 1 and not checkpoint.load(run_dir).history[-1]["round"] == 2
        began = time.monotonic()
        resumed = flwr_run("loopback", " ".join([*settings, f"resume={run_dir}"]), link.env)
        took = time.monotonic() - began
    output = resumed.stdout + resumed.stderr
    (tmp_path / "flwr-run-1.log").write_text(interrupted.stdout + interrupted.stderr)
    (tmp_path / "flwr-run-2.log").write_text(output)
    print(f"interrupted run: exit {interrupted.returncode}; resumed run: {took:.0f} s")
    assert resumed.returncode == 0 and "resuming after round 1" in output, output
    _, rounds, summary = read_run(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2] and summary["finished"]
    # bit for bit the uninterrupted deployment's final global vector; the simulation's up to float
    # summation order (its actors train with other thread counts than a ClientApp process)
    final = checkpoint.load(run_dir).values
    np.testing.assert_array_equal(final, checkpoint.load(loopback_deployment.run_dir).values)
    np.testing.assert_allclose(final, checkpoint.load(simulated).values, rtol=0, atol=1e-6)


# --- A bad network (issue 27, item 3) -------------------------------------------------------------
# Full fine-tuning of the tiny model (8 MB messages) through a relay that delays every chunk by
# 20 ms each way, caps each connection at 4 MB/s and resets the first connection that carries
# 2 MB in each direction: a node's pull of a message (or the FAB) and a node's push of its reply
# are cut in the middle.
NETWORK_FAULTS = Faults(latency=0.02, bandwidth=4e6, cut={UP: 2_000_000, DOWN: 2_000_000})


def test_a_bad_network_slows_rounds_but_corrupts_nothing_and_every_byte_is_counted(tmp_path):
    settings = [o for o in DEPLOYMENT if not o.startswith("method.")]
    extra = ["method=full", "federation.rounds=2", "federation.round_timeout=300", "federation.grace_min=60"]
    began = time.monotonic()
    done = deploy(tmp_path, [*settings, *extra], faults=NETWORK_FAULTS, timeout=500)
    output = done.run.stdout + done.run.stderr
    (tmp_path / "flwr-run.log").write_text(output)
    print(f"cuts {done.cuts}; {time.monotonic() - began:.0f} s; socket {done.socket}")
    assert done.run.returncode == 0 and "Traceback" not in output, output
    assert sorted(done.cuts) == [(DOWN, 2_000_000), (UP, 2_000_000)]
    _, rounds, summary = read_run(done.run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2] and summary["finished"]
    # Flower 1.41's SuperNode retries a request whose connection failed ("Connection attempt
    # failed, retrying"), so the cut pull and the cut push are sent again whole, and both rounds
    # aggregate both replies (the quorum rules would skip a round that lost too many)
    logs = "".join((tmp_path / f"supernode-{p}.log").read_text() for p in range(2))
    assert "Connection attempt failed, retrying" in logs
    for record in rounds[1:]:
        assert record["skipped"] is None and record["rejected"] == [], record
        assert record["comm"]["up"]["messages"] == 2 and np.isfinite(record["dev"]["loss"])
    assert np.isfinite(checkpoint.load(done.run_dir).values).all()
    accounted = {
        d: sum(r["comm"][d]["bytes"] + r["comm"][f"eval_{d}"]["bytes"] for r in rounds) for d in (UP, DOWN)
    }
    for d in (UP, DOWN):  # what crossed before each cut is counted too, and then sent again
        assert sum(w[d] for w in done.socket) >= accounted[d] + 2_000_000
    # the relay counted every byte that crossed, the cut ones and the retries included
    for record, sock in zip(rounds[1:], done.socket[1:]):  # socket[r]: the bytes of round r
        comm = record["comm"]
        for d in (UP, DOWN):
            assert sock[d] >= comm[d]["bytes"] + comm[f"eval_{d}"]["bytes"], (record["round"], d, sock)


# --- Strangers are refused at runtime (issue 27, item 4) ------------------------------------------
# One TLS SuperLink with SuperNode authentication (docs/deployment.md "SuperNode authentication")
# and the DEPLOYMENT run on its two registered sites, while three strangers try to join, each an
# impostor for a site's partition id (if one got in, the node identity policy would see two nodes
# answer for that id, note the conflict and leave both out of sampling):
#   stranger   the right CA, its own key, never registered   -> the SuperLink refuses activate-node (2004)
#   anonymous  the right CA, no key (Flower self-registers)  -> the SuperLink refuses register-node (2001)
#   foreign    a registered key, another CA's root certificate -> the node refuses the SuperLink (TLS)
STRANGERS_ROUNDS = 1  # the strangers are refused within seconds; one round keeps the test short
# a stranger that got in would conflict with a site at the start: the run then fails after 120 s
STRANGERS_SETTINGS = [
    *DEPLOYMENT,
    f"federation.rounds={STRANGERS_ROUNDS}",
    "federation.round_timeout=120",
    "federation.wait_timeout=120",
]
STRANGERS_REFUSALS = {  # name -> what its log must say (Flower 1.41's words)
    "stranger": "[code: 2004] Failed to activate SuperNode.",
    "anonymous": "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered",
    "foreign": "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
}


def _strangers_script(*args: str, env: dict[str, str] | None = None) -> None:
    """Runs scripts/`args[0]` with the remaining arguments (certificates, keys)."""
    script, *rest = args
    subprocess.run(["bash", str(ROOT / "scripts" / script), *rest], check=True, capture_output=True, env=env)


def _strangers_pem(public_key: Path) -> bytes:
    """An OpenSSH public key as the SuperLink stores it (PEM SubjectPublicKeyInfo)."""
    key = load_ssh_public_key(public_key.read_bytes())
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _strangers_pull_status(port: int, ca: Path, private_key: Path, node_id: int) -> int:
    """HTTP status of one pull-messages request signed with `private_key` that claims to be
    `node_id`, sent the way a SuperNode sends it (Flower's own Fleet client, no retries)."""
    key = load_ssh_private_key(private_key.read_bytes(), None)
    interceptor = NodeAuthHttpInterceptor(key, key.public_key())
    client = FleetHttpClient.from_server_address(f"127.0.0.1:{port}", False, ca.read_bytes(), [interceptor])
    with client:
        try:
            client.PullMessages(PullMessagesRequest(node=Node(node_id=node_id)))
        except httpx.HTTPStatusError as exc:
            return exc.response.status_code
    return 200


def _strangers_nodes(state_db: Path) -> dict[int, tuple[bytes, str, str | None]]:
    """The SuperLink's node table (Flower 1.41's SQL link state, read-only): node id -> (public
    key, status, last activation). Node ids are stored as signed 64-bit integers."""
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT node_id, public_key, status, last_activated_at FROM node").fetchall()
    return {(n + 2**64 if n < 0 else n): (key, status, activated) for n, key, status, activated in rows}


def test_strangers_are_refused_while_the_registered_sites_finish_the_run(tmp_path):
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot generate certificates and keys")
    began = time.monotonic()
    certs, other_ca, keys = tmp_path / "certificates", tmp_path / "other-ca", tmp_path / "keys"
    # no Runtime API certificates (the SuperNodes' Runtime APIs stay local), 2048-bit keys: faster
    no_node_certs = dict(os.environ, SUPERNODES="", BITS="2048")
    _strangers_script("generate-certs.sh", str(certs), env=no_node_certs)
    _strangers_script("generate-certs.sh", str(other_ca), env=no_node_certs)  # a second, unrelated CA
    _strangers_script("generate-supernode-keys.sh", str(keys), "site-0", "site-1", "foreign", "stranger")

    home, port, out = tmp_path / "flwr-home", free_port(), tmp_path / "results"
    write_connection(home, "strangers", port, root_certificates=certs / "ca.crt")
    env = flower_env(home)
    rounds_file = out / "strangers" / "rounds.jsonl"
    refused_after: dict[str, float] = {}
    with processes(tmp_path, home) as start, ThreadPoolExecutor(3) as pool:
        link = start(
            "superlink", superlink_argv(port, tmp_path / "state.db", certs, supernode_auth=True), env
        )
        wait_for_port(port, link)
        registered = dict(
            zip(
                ("site-0", "site-1", "foreign"),
                pool.map(
                    lambda name: register_supernode(keys / f"{name}.pub", "strangers", env),
                    ("site-0", "site-1", "foreign"),
                ),
            )
        )

        def supernode(name: str, partition: int, ca: Path, key: Path | None):
            return start(name, supernode_argv(port, partition, 2, ca, auth_key=key), env)

        # the strangers start first (under load their first request may still come after the sites')
        launched = time.monotonic()
        strangers = {
            "stranger": supernode("stranger", 0, certs, keys / "stranger"),
            "anonymous": supernode("anonymous", 1, certs, None),
            "foreign": supernode("foreign", 1, other_ca, keys / "foreign"),
        }
        supernode("site-0", 0, certs, keys / "site-0")
        supernode("site-1", 1, certs, keys / "site-1")
        settings = " ".join([*STRANGERS_SETTINGS, f"output_dir={out}", "run_name=strangers"])
        run = pool.submit(flwr_run, "strangers", settings, env, timeout=300)
        pulls = None
        while not run.done():
            for name, proc in strangers.items():
                if name not in refused_after and proc.poll() is not None:
                    refused_after[name] = time.monotonic() - launched
            if pulls is None and rounds_file.exists():  # round 0 is written: the sites are online
                # a stranger that skips activation and claims site-0's node id, and site-1
                # (registered) claiming site-0's id: both refused before any message is read
                pulls = {
                    who: _strangers_pull_status(port, certs / "ca.crt", keys / who, registered["site-0"])
                    for who in ("stranger", "site-1")
                }
            time.sleep(0.2)
        result = run.result()
        for proc in strangers.values():
            proc.wait(timeout=30)  # they exited long ago; a stranger that retries forever fails here
        nodes = _strangers_nodes(tmp_path / "state.db")
    assert leftovers(home) == []
    output = result.stdout + result.stderr
    (tmp_path / "flwr-run.log").write_text(output)
    refused = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(refused_after.items()))
    print(
        f"set-up {launched - began:.0f} s; strangers refused after: {refused}; the test took {time.monotonic() - began:.0f} s"
    )

    # The registered sites ran every round, and only they: both partitions by the same two nodes,
    # no identity conflict, no dropped reply.
    assert result.returncode == 0, output
    _, rounds, summary = read_run(out / "strangers")
    assert [r["round"] for r in rounds] == list(range(STRANGERS_ROUNDS + 1))
    assert [r["sampled"] for r in rounds] == [[], *[[0, 1]] * STRANGERS_ROUNDS], output
    for record in rounds[1:]:
        assert record["comm"]["down"]["messages"] == record["comm"]["up"]["messages"] == 2
        assert record["skipped"] is None and record["rejected"] == []
    assert all(r["node_notes"] == [] for r in rounds), [r["node_notes"] for r in rounds]
    assert summary["finished"] and summary["rounds_done"] == STRANGERS_ROUNDS
    assert summary["rejected_replies"] == 0 and summary["skipped_rounds"] == []

    # Each stranger gave up (Flower 1.41: "Exit Code: 305" logged, process status 1) without a
    # node id, so nothing was ever addressed to it; the sites got the ids they were registered with.
    for name, proc in strangers.items():
        log = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 1 and "Exit Code: 305" in log, log
        assert STRANGERS_REFUSALS[name] in log, log
        assert "SuperNode ID" not in log, log
    for site in ("site-0", "site-1"):
        assert f"SuperNode ID: {registered[site]}" in (tmp_path / f"{site}.log").read_text()
    link_log = (tmp_path / "superlink.log").read_text()
    assert "[/v1/fleet/activate-node][ApiError:2004]" in link_log
    assert "[/v1/fleet/register-node][ApiError:2001]" in link_log

    # The SuperLink knows the three registered keys and no other; the foreign-CA node's key is
    # registered but was never activated (its TLS handshake failed before any request).
    assert set(nodes) == set(registered.values())
    assert _strangers_pem(keys / "stranger.pub") not in {key for key, _, _ in nodes.values()}
    for name, node_id in registered.items():
        assert nodes[node_id][0] == _strangers_pem(keys / f"{name}.pub")
    assert nodes[registered["foreign"]][1:] == ("registered", None)
    assert all(nodes[registered[site]][2] is not None for site in ("site-0", "site-1"))

    # Skipping activation does not help: a pull-messages request signed with a key that does not
    # own the node id it claims is refused (401), whether the key is unregistered or another site's.
    assert pulls == {"stranger": 401, "site-1": 401}
