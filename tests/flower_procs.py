"""Start real Flower processes on loopback for tests, and always stop them again."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(flwr_home: Path, name: str, port: int, root_certificates: Path | None = None) -> None:
    """A SuperLink connection in $FLWR_HOME/config.toml (Flower 1.41 keeps them there)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n')


@contextmanager
def processes(log_dir: Path) -> Iterator:
    """Yields `start(name, argv, env)`; every process (and its children) is killed on exit."""
    started: list[subprocess.Popen] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc, signal.SIGKILL)
            proc.wait()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
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


def flwr_run(connection: str, overrides: str, env: dict[str, str], federation_config: str | None = None,
             timeout: float = 400) -> subprocess.CompletedProcess:
    argv = [str(BIN / "flwr"), "run", str(ROOT), connection, "--stream",
            "--run-config", f'overrides="{overrides}"']
    if federation_config:
        argv += ["--federation-config", federation_config]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def leftovers(flwr_home: Path) -> list[str]:
    """Processes still alive that were started with this FLWR_HOME (there must be none)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(f"{proc.info['pid']} {proc.info['name']}")
        except (psutil.Error, OSError):
            continue
    return found
