"""The compose stack in real containers: build the image offline, bring up SuperLink, ServerApp
SuperExec and two SuperNodes with their ClientApp SuperExecs (host network, 127.0.0.1 only), run
2 rounds of PaFi with `flwr run`, compare the run directory with a simulation of the same seed,
and tear everything down (containers, volumes, the test's own dockerd).

Skipped, with the reason, where no daemon can run (not root, dockerd not installed). .ci/run
installs Docker and sets FEDSPARSE_REQUIRE_CONTAINERS=1, which turns that skip into a failure.
Timings and the image size go to outputs/containers/<stack>.json and the test's output (-s).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

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
from harness.federation import DEPLOYMENT
from harness.loopback import assert_matches_simulation

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


def _stack(tmp_path: Path, daemon: dict, tls: bool) -> dict:
    """Bring the two-node stack up, run the federation, collect the run dir; always tear down."""
    env, files = daemon["env"], [tmp_path / name for name in FILES[: 2 if tls else 1]]
    write_compose(tmp_path, 2, context=str(ROOT))  # == the committed files (test_compose checks)
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
    figures = dict(daemon["figures"])
    try:
        start = time.monotonic()
        compose(env, files, "up", "-d", "--no-build", "--wait", "--wait-timeout", "180")
        figures["stack_up_s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        overrides = " ".join(
            [*DEPLOYMENT, "federation.rounds=2", "output_dir=/app/results", "run_name=deployed"]
        )
        run = flwr_run("docker", overrides, flower_env(home), timeout=900)
        figures["flwr_run_s"] = round(time.monotonic() - start, 1)
        if run.returncode != 0 or "[round 2/2]" not in run.stdout:
            logs = compose(env, files, "logs", "--no-color", "--tail", "60")
            pytest.fail(f"flwr run failed:\n{run.stdout[-4000:]}{run.stderr[-2000:]}\n{logs[-6000:]}")
        compose(env, files, "cp", "serverapp:/app/results/deployed", str(tmp_path / "deployed"))
    finally:
        start = time.monotonic()
        compose(env, files, "down", "--volumes", "--remove-orphans", "--timeout", "10")
        figures["down_s"] = round(time.monotonic() - start, 1)
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{'tls' if tls else 'plain'}.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"containers ({'tls' if tls else 'plain'}): {figures}")
    return figures


@pytest.mark.containers
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_compose_stack_in_containers_matches_simulation(tmp_path, daemon, simulated, tls):
    _stack(tmp_path, daemon, tls)
    assert_matches_simulation(tmp_path / "deployed", simulated)


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
