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

from fedsparse.config import compose_config
from fedsparse.results import read_run
from fedsparse.simulation import run_simulation

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
    with processes(tmp_path, home) as start:
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
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={pid} num-partitions=2",
                ],
                env,
            )
        settings = OVERRIDES + [
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
    return out / "deployed"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
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


def test_loopback_deployment_matches_simulation(tmp_path, simulated):
    _assert_matches_simulation(deploy(tmp_path), simulated)


def test_loopback_deployment_with_tls(tmp_path, simulated):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot generate certificates")
    certs = tmp_path / "certificates"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(certs)], check=True, capture_output=True
    )
    _assert_matches_simulation(deploy(tmp_path, tls=certs), simulated)
