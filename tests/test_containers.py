"""The compose stack in real containers: build the image offline, bring up SuperLink, ServerApp
SuperExec and two SuperNodes with their ClientApp SuperExecs (host network, 127.0.0.1 only), run
2 rounds of PaFi with `flwr run`, compare the run directory with a simulation of the same seed,
and tear everything down (containers, volumes, the test's own dockerd). Also issue 27's
kill-and-return case: a data owner's containers killed mid-round come back by the restart policy.

Skipped, with the reason, where no daemon can run (not root, dockerd not installed). .ci/run
installs Docker and sets FEDSPARSE_REQUIRE_CONTAINERS=1, which turns that skip into a failure.
Timings and the image size go to outputs/containers/<stack>.json and the test's output (-s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from harness.compose import parsed, services
from harness.containers import (
    build_image,
    compose,
    debian_mirror,
    docker,
    docker_daemon,
    host_network_override,
    image_size,
    unavailable,
)
from harness.federation import DEPLOYMENT, KILLED_SETTINGS
from harness.loopback import (
    assert_matches_simulation,
    assert_the_killed_node_rejoined,
    node_ids,
    until_round_2_reached,
)

from fedsparse.deploy.compose import FILES, write_compose
from fedsparse.deploy.loopback import ROOT, flower_env, flwr_run, write_connection

FIGURES = ROOT / "outputs" / "containers"


@pytest.fixture(scope="module")
def daemon() -> dict:
    """A running private dockerd with the project image built; yields env and figures."""
    reason = unavailable()
    if reason:
        if os.environ.get("FEDSPARSE_REQUIRE_CONTAINERS") == "1":
            pytest.fail(f"container test required (FEDSPARSE_REQUIRE_CONTAINERS=1) but: {reason}")
        pytest.skip(reason)
    with docker_daemon() as env:
        start = time.monotonic()
        build_image(env)
        figures = {"build_s": round(time.monotonic() - start, 1), "image_bytes": image_size(env)}
        yield {"env": env, "figures": figures}
        # nothing of ours is left in the daemon but images (the build cache)
        assert docker(env, "ps", "-aq").split() == []
        assert docker(env, "volume", "ls", "-q").split() == []


@dataclass
class Stack:
    """A compose stack that is up: its daemon env, compose files, `flwr` home and timings."""

    env: dict[str, str]
    files: list[Path]
    home: Path
    figures: dict

    def compose(self, *args: str) -> str:
        return compose(self.env, self.files, *args)

    def fail(self, run: subprocess.CompletedProcess, why: str) -> NoReturn:
        logs = self.compose("logs", "--no-color", "--tail", "60")
        pytest.fail(f"{why}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}\n{logs[-6000:]}")


@contextmanager
def _stack(tmp_path: Path, daemon: dict, tls: bool, nodes: int = 2) -> Iterator[Stack]:
    """The stack for `nodes` data owners, up on the host network; always torn down afterwards."""
    env, files = daemon["env"], [tmp_path / name for name in FILES[: 2 if tls else 1]]
    write_compose(tmp_path, nodes, context=str(ROOT))  # == the committed files for 2 (test_compose)
    if tls:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(tmp_path / "certificates")],
            check=True,
            capture_output=True,
        )
        for path in (tmp_path / "certificates").iterdir():  # the containers run as uid 49999
            os.chown(path, 49999, 49999)
        (tmp_path / "certificates" / "ca.key").unlink()  # not needed on a deployment host
    ports = host_network_override(files, tmp_path / "host-network.yml")
    files.append(tmp_path / "host-network.yml")
    home = tmp_path / "flwr-home"
    write_connection(
        home, "docker", ports["superlink"], tmp_path / "certificates" / "ca.crt" if tls else None
    )
    stack = Stack(env, files, home, dict(daemon["figures"]))
    try:
        start = time.monotonic()
        stack.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "180")
        stack.figures["stack_up_s"] = round(time.monotonic() - start, 1)
        yield stack
    finally:
        start = time.monotonic()
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
        stack.figures["down_s"] = round(time.monotonic() - start, 1)


def _save_figures(name: str, figures: dict) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"containers ({name}): {figures}")


@pytest.mark.containers
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_compose_stack_in_containers_matches_simulation(tmp_path, daemon, simulated, tls):
    with _stack(tmp_path, daemon, tls) as stack:
        start = time.monotonic()
        overrides = " ".join(
            [*DEPLOYMENT, "federation.rounds=2", "output_dir=/app/results", "run_name=deployed"]
        )
        run = flwr_run("docker", overrides, flower_env(stack.home), timeout=900)
        stack.figures["flwr_run_s"] = round(time.monotonic() - start, 1)
        if run.returncode != 0 or "[round 2/2]" not in run.stdout:
            stack.fail(run, "flwr run failed")
        stack.compose("cp", "serverapp:/app/results/deployed", str(tmp_path / "deployed"))
    _save_figures("tls" if tls else "plain", stack.figures)
    assert_matches_simulation(tmp_path / "deployed", simulated)


def _inspect(stack: Stack, service: str, field: str) -> int:
    """An integer field of a service's container (e.g. `.State.Pid`: its init process on the host,
    docker-init, pid 1 inside, as `init: true`)."""
    container = stack.compose("ps", "-q", service).strip()
    return int(docker(stack.env, "inspect", "-f", f"{{{{{field}}}}}", container))


def _node_ids(stack: Stack, service: str) -> list[int]:
    """The SuperNode ids a node service logged, one per start of its container."""
    return node_ids(stack.compose("logs", "--no-color", service))


@pytest.mark.containers
def test_a_node_container_killed_mid_round_is_restarted_by_compose_and_rejoins(tmp_path, daemon):
    """Issue 27's kill-and-return case in containers: three data owners, quorum 2; early in round
    2, data owner 3's SuperNode and ClientApp containers lose power (their init processes get
    SIGKILL from the host, so every process inside dies at once). Compose's restart policy
    (`unless-stopped`) starts both again with the same node config; the round ends a grace period
    after the two healthy replies, records the dead node, and the returned node trains in round 3."""
    with _stack(tmp_path, daemon, tls=False, nodes=3) as stack, ThreadPoolExecutor(1) as pool:
        settings = " ".join([*KILLED_SETTINGS, "output_dir=/app/results", "run_name=killed"])
        start = time.monotonic()
        run = pool.submit(flwr_run, "docker", settings, flower_env(stack.home), timeout=900)
        until_round_2_reached(lambda: stack.compose("logs", "--no-color", "supernode-3"), run)
        dead = _node_ids(stack, "supernode-3")[0]
        for service in ("supernode-3", "clientapp-3"):
            os.kill(_inspect(stack, service, ".State.Pid"), signal.SIGKILL)
        killed_at = time.monotonic()
        result = run.result()
        stack.figures.update(
            flwr_run_s=round(time.monotonic() - start, 1), after_kill_s=round(time.monotonic() - killed_at, 1)
        )
        if result.returncode != 0 or "Traceback" in result.stdout + result.stderr:
            stack.fail(result, "flwr run failed")
        ids = _node_ids(stack, "supernode-3")
        restarts = {s: _inspect(stack, s, ".RestartCount") for s in ("supernode-3", "clientapp-3")}
        stack.compose("cp", "serverapp:/app/results/killed", str(tmp_path / "killed"))
    assert min(restarts.values()) >= 1, restarts  # compose's restart policy brought both back
    assert ids[0] == dead and ids[-1] != dead, ids  # one id per start: the old one, then a new one
    stack.figures["round_2_s"] = round(assert_the_killed_node_rejoined(tmp_path / "killed", dead, ids[-1]), 1)
    _save_figures("killed", stack.figures)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_host_network_override_binds_everything_to_loopback(tmp_path, tls):
    """No daemon needed: the override the container test uses leaves no bridge network, no
    published port, no service-name address and no 0.0.0.0, and Flower still parses every command."""
    write_compose(tmp_path, 2, context=str(ROOT))
    files = [tmp_path / name for name in FILES[: 2 if tls else 1]]
    ports = host_network_override(files, tmp_path / "host-network.yml")
    files.append(tmp_path / "host-network.yml")
    assert len(set(ports.values())) == 3
    for name, service in services(files).items():
        assert service["network_mode"] == "host" and not service.get("ports"), name
        assert not service.get("networks"), name
    for name, (program, args, argv) in parsed(files).items():
        addresses = [a for a in argv if ":" in a and a[0].isdigit()]
        assert all(a.startswith("127.0.0.1:") for a in addresses), (name, argv)
        assert "0.0.0.0" not in argv, (name, argv)
        if program == "flower-superexec":  # the ServerApp's at the SuperLink, a ClientApp's at its node
            target = "superlink" if name == "serverapp" else name.replace("clientapp", "supernode")
            assert args.runtime_api_address == f"127.0.0.1:{ports[target]}", name
        else:
            assert (args.host, args.port) == ("127.0.0.1", ports[name]), name


def test_the_base_image_comes_from_the_debian_archive_apt_uses(tmp_path):
    """Not from a third-party or disabled repository listed beside it (this machine has both)."""
    lists = tmp_path / "sources.list.d"
    lists.mkdir()
    third_party = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
    (lists / "nodesource.sources").write_text(third_party)
    (lists / "a.sources.disabled").write_text(third_party.replace("nodistro", "bookworm"))
    (lists / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    assert debian_mirror(apt=tmp_path) == "http://mirror.example/debian"
    (lists / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert debian_mirror(apt=tmp_path) == "http://old.example/debian"
    (tmp_path / "sources.list").unlink()
    assert debian_mirror(apt=tmp_path) == "http://deb.debian.org/debian"
