"""A Ray head on 127.0.0.1 (`ray start --head`), stopped again with everything it started."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from fedsparse.deploy.loopback import free_port

RAY = str(Path(sys.executable).parent / "ray")


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the cluster under `temp_dir` (its path is on their command lines)."""
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(str(temp_dir) in part for part in (p.info["cmdline"] or []))
    ]


def _stop(temp_dir: Path) -> None:
    """Stop only this cluster (not `ray stop`, which would stop every cluster here)."""
    heads = cluster_processes(temp_dir)
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


@contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[tuple[str, Path]]:
    """Yields (address, temp dir). Ray's unix sockets live under the temp dir, whose path must
    stay short (AF_UNIX: 107 bytes), hence /tmp."""
    port, temp_dir = free_port(), Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    argv = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    argv += ["--num-cpus", str(num_cpus), "--include-dashboard", "false"]
    argv += ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
    try:
        start = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
