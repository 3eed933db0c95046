"""Deployment on loopback: a real SuperLink and two SuperNodes (the commands the containers
run), driven by `flwr run`, compared with a simulation of the same seed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from flower_procs import (
    BIN,
    ROOT,
    flower_env,
    flwr_run,
    free_port,
    leftovers,
    processes,
    wait_for_port,
    write_connection,
)
from flwr.cli.build import build_fab_from_disk

from fedsparse.apps.simulation import run_simulation
from fedsparse.deploy.relay import DOWN, UP, Relay, windows
from fedsparse.report.results import read_run
from fedsparse.run import compose_config

OVERRIDES = [
    "model=tiny",
    "federation.num_clients=2",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "data.max_train_examples=400",
    "data.max_eval_examples=32",
    "data.max_length=32",
    "method.density=0.05",
]


def deploy(tmp_path: Path, tls: Path | None = None, rounds: int = 2, extra: tuple[str, ...] = ()) -> Path:
    """Run `rounds` rounds of PaFi (with `extra` overrides) on SuperLink + 2 SuperNodes; returns the
    run directory."""
    return deploy_measured(tmp_path, tls, rounds, extra)[0]


def deploy_measured(
    tmp_path: Path, tls: Path | None = None, rounds: int = 2, extra: tuple[str, ...] = ()
) -> tuple[Path, list[dict[str, int]]]:
    """`deploy`, also returning the bytes that crossed the SuperNode <-> SuperLink sockets (the
    nodes connect through a counting relay) per window: [r] is round r (the bytes up to the
    rounds.jsonl line that closes it; [0]: registration and start), [-1] the shutdown."""
    home, port = tmp_path / "flwr-home", free_port()
    write_connection(home, "loopback", port, root_certificates=tls / "ca.crt" if tls else None)
    env = flower_env(home)
    link_security = (
        [
            "--ssl-ca-certfile",
            str(tls / "ca.crt"),
            "--ssl-certfile",
            str(tls / "server.pem"),
            "--ssl-keyfile",
            str(tls / "server.key"),
        ]
        if tls
        else ["--insecure"]
    )
    node_security = ["--root-certificates", str(tls / "ca.crt")] if tls else ["--insecure"]
    out = tmp_path / "results"
    with Relay(("127.0.0.1", port)) as relay, processes(tmp_path, home) as start:
        relay.watch(out / "deployed" / "rounds.jsonl")
        link = start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *link_security,
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            env,
        )
        wait_for_port(port, link)
        for pid in range(2):
            start(
                f"supernode-{pid}",
                [
                    str(BIN / "flower-supernode"),
                    *node_security,
                    "--superlink",
                    f"127.0.0.1:{relay.port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={pid} num-partitions=2",
                ],
                env,
            )
        other_method = any(e.startswith("method=") for e in extra)  # then PaFi's density must go
        settings = [o for o in OVERRIDES if not (other_method and o.startswith("method."))] + [
            f"federation.rounds={rounds}",
            *extra,
            f"output_dir={out}",
            "run_name=deployed",
        ]
        run = flwr_run("loopback", " ".join(settings), env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"[round {rounds}/{rounds}]" in run.stdout
        if tls:  # the same SuperLink refuses a client that does not speak TLS
            write_connection(home, "plaintext", port)
            plain = subprocess.run(
                [str(BIN / "flwr"), "ls", "plaintext"],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert plain.returncode != 0
    assert leftovers(home) == []  # every process it started is gone
    return out / "deployed", windows(relay.marks, relay.snapshot())


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, shared_ray) -> Path:
    out = tmp_path_factory.mktemp("sim")
    return run_simulation(compose_config(OVERRIDES + [f"output_dir={out}", "run_name=simulated"]))


def _assert_matches_simulation(deployed: Path, simulated: Path) -> None:
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


def _assert_socket_bytes(run_dir: Path, socket: list[dict[str, int]], nodes: int = 2) -> None:
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


def _assert_setup_paid_per_message(deployed: Path, simulated: Path) -> None:
    """Per-message overhead (message arrival, i.e. the ClientApp process start, to the first
    training step): a deployment pays it on every message, a simulation actor only on its first."""
    for d, s in zip(read_run(deployed)[1][1:], read_run(simulated)[1][1:]):
        setup, train = d["train"]["setup-seconds"], d["train"]["train-seconds"]
        print(f"round {d['round']}: per-message overhead {setup:.1f} s, local training {train:.1f} s")
        assert setup > 0 and s["train"]["setup-seconds"] >= 0
    assert d["train"]["setup-seconds"] > s["train"]["setup-seconds"]  # the last round: actors are warm


def test_loopback_deployment_matches_simulation(tmp_path, simulated):
    run_dir, socket = deploy_measured(tmp_path)
    _assert_matches_simulation(run_dir, simulated)
    _assert_socket_bytes(run_dir, socket)
    _assert_setup_paid_per_message(run_dir, simulated)


def test_loopback_socket_bytes_full_finetuning(tmp_path):
    """Full fine-tuning of the tiny model (8 MB per message): socket bytes within the same bound."""
    _assert_socket_bytes(*deploy_measured(tmp_path, rounds=1, extra=("method=full",)))


def test_loopback_deployment_with_tls(tmp_path, simulated):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot generate certificates")
    certs = tmp_path / "certificates"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(certs)], check=True, capture_output=True
    )
    run_dir, socket = deploy_measured(tmp_path, tls=certs)
    _assert_matches_simulation(run_dir, simulated)
    _assert_socket_bytes(run_dir, socket)
