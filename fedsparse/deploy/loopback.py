"""Real Flower processes on 127.0.0.1, always stopped again: a SuperLink, SuperNodes (through the
byte-counting relay) and `flwr run`, for the tests and experiments/socket_bytes.py.

Nothing here imports Flower: the processes are Flower's own commands, from the running
interpreter's environment (`BIN`). `ROOT` is the project checkout `flwr run` builds the FAB from.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedsparse.deploy.relay import Faults, Relay, windows

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What every Flower and fedsparse process here runs with: offline, no runtime installs.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)  # a caller's Ray head (the tests' shared one) is not for Flower's own runs
    return env


def write_connection(flwr_home: Path, name: str, port: int, root_certificates: Path | None = None) -> None:
    """A SuperLink connection in $FLWR_HOME/config.toml (Flower 1.41 keeps them there)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


@contextmanager
def processes(log_dir: Path, flwr_home: Path) -> Iterator:
    """Yields `start(name, argv, env)`. On exit every process started, its descendants and
    anything else launched with this FLWR_HOME (Flower detaches some children) is killed."""
    started: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        victims = {p.pid for p in started} | _descendants(started) | _with_home(flwr_home)
        for pid in victims:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in victims):
            time.sleep(0.2)
        for pid in victims | _with_home(flwr_home):
            _signal(pid, signal.SIGKILL)
        for proc in started:
            proc.wait()


def _descendants(started: list[subprocess.Popen]) -> set[int]:
    pids = set()
    for proc in started:
        try:
            pids |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
    return pids


def _with_home(flwr_home: Path) -> set[int]:
    return {int(entry.split()[0]) for entry in leftovers(flwr_home)}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def flwr_run(
    connection: str,
    overrides: str,
    env: dict[str, str],
    federation_config: str | None = None,
    timeout: float = 400,
) -> subprocess.CompletedProcess:
    argv = [
        str(BIN / "flwr"),
        "run",
        str(ROOT),
        connection,
        "--stream",
        "--run-config",
        f'overrides="{overrides}"',
    ]
    if federation_config:
        argv += ["--federation-config", federation_config]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def started_with(flwr_home: Path) -> list[psutil.Process]:
    """Processes alive now that were started with this FLWR_HOME (this process left out)."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def leftovers(flwr_home: Path) -> list[str]:
    """Processes still alive that were started with this FLWR_HOME (there must be none)."""
    return [f"{proc.info['pid']} {proc.info['name']}" for proc in started_with(flwr_home)]


def superlink_argv(
    port: int,
    database: Path | None = None,
    tls: Path | None = None,
    simulation: bool = False,
    supernode_auth: bool = False,
) -> list[str]:
    """`flower-superlink` on 127.0.0.1:`port` (subprocess isolation; `tls`: a generate-certs.sh dir; `supernode_auth`: registered keys only)."""
    security = (
        ["--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "server.pem")]
        + ["--ssl-keyfile", str(tls / "server.key")]
        if tls
        else ["--insecure"]
    )
    security += ["--enable-supernode-auth"] if supernode_auth else []
    argv = [str(BIN / "flower-superlink"), *security, *(["--simulation"] if simulation else [])]
    argv += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--database", str(database)] if database else []
    return argv + ["--disable-runtime-dependency-installation"]


def supernode_argv(
    superlink_port: int,
    partition: int,
    partitions: int,
    tls: Path | None = None,
    auth_key: Path | None = None,
) -> list[str]:
    """`flower-supernode` for partition `partition` of `partitions`, connecting to 127.0.0.1:`superlink_port` (`auth_key`: its private key)."""
    security = ["--root-certificates", str(tls / "ca.crt")] if tls else ["--insecure"]
    security += ["--auth-supernode-private-key", str(auth_key)] if auth_key else []
    argv = [str(BIN / "flower-supernode"), *security, "--superlink", f"127.0.0.1:{superlink_port}"]
    argv += ["--port", str(free_port())]
    return argv + ["--node-config", f"partition-id={partition} num-partitions={partitions}"]


def register_supernode(public_key: Path, connection: str, env: dict[str, str]) -> int:
    """Registers a SuperNode's public key (`flwr supernode register`) and returns its node id."""
    argv = [str(BIN / "flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or "{" not in done.stdout:
        raise RuntimeError(f"flwr supernode register {public_key} failed: {done.stdout}{done.stderr}")
    reply, _ = json.JSONDecoder().raw_decode(done.stdout, done.stdout.index("{"))
    return int(reply["node-id"])


@dataclass
class Deployment:
    """What `deploy` leaves behind: the run directory, `flwr run`'s output, the bytes per window
    that crossed the SuperNode <-> SuperLink sockets ([r]: round r, the bytes up to the
    rounds.jsonl line that closes it; [0] registration and start; [-1] the shutdown), what a
    plaintext client got from a TLS SuperLink (None without TLS) and the connections cut."""

    run_dir: Path
    run: subprocess.CompletedProcess
    socket: list[dict[str, int]] = field(default_factory=list)
    plaintext: subprocess.CompletedProcess | None = None
    cuts: list[tuple[str, int]] = field(default_factory=list)  # the relay's cut connections


def deploy(
    work: Path,
    settings: list[str],
    tls: Path | None = None,
    nodes: int = 2,
    timeout: float = 400,
    faults: Faults | None = None,
) -> Deployment:
    """One `flwr run` with the run-config `settings` on a SuperLink and `nodes` SuperNodes (each
    connected through a counting relay, a bad network with `faults`), all started under `work`
    and stopped before it returns. `tls`: a scripts/generate-certs.sh directory. Raises if any
    process outlives it."""
    home, port, out = work / "flwr-home", free_port(), work / "results"
    write_connection(home, "loopback", port, root_certificates=tls / "ca.crt" if tls else None)
    env = flower_env(home)
    plaintext = None
    with Relay(("127.0.0.1", port), faults=faults) as relay, processes(work, home) as start:
        relay.watch(out / "deployed" / "rounds.jsonl")
        link = start("superlink", superlink_argv(port, work / "state.db", tls), env)
        wait_for_port(port, link)
        for pid in range(nodes):
            start(f"supernode-{pid}", supernode_argv(relay.port, pid, nodes, tls), env)
        run = flwr_run(
            "loopback", " ".join([*settings, f"output_dir={out}", "run_name=deployed"]), env, timeout=timeout
        )
        if tls and run.returncode == 0:  # does the same SuperLink refuse a client without TLS?
            write_connection(home, "plaintext", port)
            argv = [str(BIN / "flwr"), "ls", "plaintext"]
            plaintext = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    left = leftovers(home)
    if left:
        raise RuntimeError(f"processes outlived the deployment: {left}")
    return Deployment(out / "deployed", run, windows(relay.marks, relay.snapshot()), plaintext, relay.cuts)
