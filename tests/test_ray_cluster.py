"""Simulation beyond one machine: attach the simulation engine to an existing Ray cluster
(`ray start --head` here on 127.0.0.1; other machines would join with `ray start --address`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from flower_procs import free_port

from fedsparse.config import compose_config
from fedsparse.results import read_run
from fedsparse.simulation import run_simulation

RAY = str(Path(sys.executable).parent / "ray")


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only this test's cluster (not `ray stop`, which would stop every cluster here)."""
    heads = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(str(temp_dir) in part for part in (p.info["cmdline"] or []))
    ]
    procs = set(heads)
    for p in heads:
        try:
            procs |= set(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs), timeout=10)


def test_simulation_attaches_to_a_running_ray_head(tmp_path):
    # Ray's unix sockets live under --temp-dir, whose path must stay short (AF_UNIX: 107 bytes)
    port, temp_dir = free_port(), Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    start = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        cfg = compose_config(
            [
                "+experiment=smoke",
                f"federation.ray_address=127.0.0.1:{port}",
                f"output_dir={tmp_path}",
                "run_name=on-cluster",
            ]
        )
        _, rounds, summary = read_run(run_simulation(cfg))
        assert len(rounds) == 3 and summary["rounds"] == 2
        # the clients ran as workers of this cluster: its session logged our driver and actors
        logs = list((temp_dir / "session_latest" / "logs").glob("*"))
        assert any("driver" in p.name for p in logs) and any("worker" in p.name for p in logs)
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(str(temp_dir) in part for part in (p.info["cmdline"] or []))
    ]
