"""Compose files for N data owners: `python -m fedsparse.deploy compose --nodes N`.

Writes docker-compose.yml (SuperLink, ServerApp SuperExec, and per data owner a SuperNode with
its ClientApp SuperExec and its data), docker-compose.tls.yml (each service mounts ca.crt and only
its own certificate and key; ca.key never) and docker-compose.auth.yml (each SuperNode its own
private key). The committed files in the repository are this generator's output for N=2
(tests/test_compose.py checks it), so hand edits belong here.

The files are templates rather than `yaml.safe_dump` output because they are built on anchors and
merge keys (`<<: *supernode`), the `!override` tag and comments, none of which safe_dump writes;
every value a user passes (build context, data directory) is written as a YAML scalar by PyYAML,
quoted where YAML needs it, with `$` doubled for Compose's interpolation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

FILES = ("docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml")

BASE_HEAD = """\
# fedsparse federation on Flower 1.41.0, in Flower's process-isolation layout:
#   superlink     flower-superlink: Fleet, Control and Runtime APIs, all on ONE port in 1.41 (9091)
#   serverapp     flower-superexec: launches the ServerApp (flwr-serverapp) of every run
#   supernode-i   flower-supernode: one data owner; its shard comes from its node config
#   clientapp-i   flower-superexec: launches supernode-i's ClientApps (flwr-clientapp)
# Every service runs the same image (Dockerfile). Plain-text links here; TLS and SuperNode
# authentication are override files (docker-compose.tls.yml, docker-compose.auth.yml).
#
#   docker compose up -d --build
#   flwr run . docker --stream --run-config \\
#     'overrides="output_dir=/app/results federation.num_clients=<N> federation.clients_per_round=<N>"'
# (`docker` is a SuperLink connection in $FLWR_HOME/config.toml: docs/deployment.md)
#
# Generated for <N> data owners by `python -m fedsparse.deploy compose --nodes <N>`, which also
# writes docker-compose.tls.yml and docker-compose.auth.yml: regenerate rather than edit by hand.

name: fedsparse

# Environment of every Flower process (also baked into the image).
x-flower-env: &flower-env
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: "1"  # else the SuperLink/SuperExec uv-install a CUDA torch
  FLWR_DISABLE_UPDATE_CHECK: "1"
  HF_HUB_OFFLINE: "1"
  HF_DATASETS_OFFLINE: "1"
  TOKENIZERS_PARALLELISM: "false"

x-fedsparse: &fedsparse
  build:
    context: <CONTEXT>
    args:
      APP_UID: ${APP_UID:-49999}
  image: fedsparse:0.1.0-flwr1.41.0
  init: true  # reaps the ServerApp/ClientApp processes the SuperExecs start
  restart: unless-stopped
  environment: *flower-env

# Shared by all SuperNodes; each node sets NODE and PARTITION_ID.
x-supernode-env: &supernode-env
  <<: *flower-env
  NUM_PARTITIONS: "<N>"      # = number of SuperNodes
  NODE_CONFIG_EXTRA: ""    # more node config, e.g. 'data-dir="/data"' (a path in the clientapp container)

x-supernode: &supernode
  <<: *fedsparse
  command:
    - sh
    - -c
    - >-
      exec flower-supernode --insecure --superlink superlink:9091
      --isolation process --host 0.0.0.0 --port 9094
      --node-config "partition-id=$${PARTITION_ID} num-partitions=$${NUM_PARTITIONS}$${NODE_CONFIG_EXTRA:+ $${NODE_CONFIG_EXTRA}}"
  depends_on:
    superlink: {condition: service_healthy}
  healthcheck:
    test: ["CMD", "python", "-c", "import socket; socket.create_connection(('127.0.0.1', 9094), 2)"]
    interval: 5s
    timeout: 3s
    retries: 24
    start_period: 5s

# Shared by all ClientApp SuperExecs; each sets SUPERNODE and mounts its own data on /data.
x-clientapp: &clientapp
  <<: *fedsparse
  command: ["sh", "-c", "exec flower-superexec --insecure --runtime-api-address $${SUPERNODE}:9094"]

services:
  superlink:
    <<: *fedsparse
    command: ["flower-superlink", "--insecure", "--isolation", "process",
              "--host", "0.0.0.0", "--port", "9091",
              "--database", "/app/state/state.db",
              "--disable-runtime-dependency-installation"]
    # SuperNodes, the SuperExecs and `flwr` all use this port. Plain text = loopback only;
    # docker-compose.tls.yml publishes it on every interface.
    ports: ["127.0.0.1:9091:9091"]
    volumes: ["superlink-state:/app/state"]  # runs, nodes and registered keys survive restarts
    healthcheck:
      test: ["CMD", "python", "-c", "import socket; socket.create_connection(('127.0.0.1', 9091), 2)"]
      interval: 5s
      timeout: 3s
      retries: 24
      start_period: 5s

  serverapp:
    <<: *fedsparse
    command: ["flower-superexec", "--insecure", "--runtime-api-address", "superlink:9091"]
    volumes:
      - results:/app/results  # <run_name>/{config.yaml, rounds.jsonl, summary.json, plots}
      - server-data:/data     # GLUE dev sets for central evaluation of non-bundled tasks (data.glue_dir=/data)
    depends_on:
      superlink: {condition: service_healthy}
"""

BASE_NODE = """
  supernode-<I>:
    <<: *supernode
    environment: {<<: *supernode-env, NODE: supernode-<I>, PARTITION_ID: "<PID>"<EXTRA>}
  clientapp-<I>:
    <<: *clientapp
    environment: {<<: *flower-env, SUPERNODE: supernode-<I>}
    volumes: [<DATA>]
    depends_on: {supernode-<I>: {condition: service_healthy}}
"""

TLS_HEAD = """\
# TLS on every link of the federation (Flower 1.41), on top of docker-compose.yml:
#   SuperNodes, the ServerApp SuperExec and `flwr` -> SuperLink   (server.pem; they trust ca.crt)
#   each ClientApp SuperExec -> its SuperNode's Runtime API        (<node>.pem; trusts ca.crt)
#
#   SUPERNODES="<NODES>" scripts/generate-certs.sh certificates [public-hostname-or-ip ...]
#   docker compose -f docker-compose.yml -f docker-compose.tls.yml up -d --build
# The containers run as uid 49999 and the keys are mode 600: on Linux either
# `sudo chown -R 49999:49999 certificates` or build with APP_UID=$(id -u) (docs/deployment.md).
# The `flwr` connection then uses root-certificates = "<abs path>/certificates/ca.crt".
#
# Least privilege: every service mounts ca.crt and only its own certificate and key, file by file.
# ca.key is mounted nowhere (keep it off the deployment host). The ClientApp SuperExecs, which run
# the submitted code, see ca.crt only. Generated by `python -m fedsparse.deploy compose --nodes <N>`.

x-ca: &ca {type: bind, source: ./certificates/ca.crt, target: /certificates/ca.crt, read_only: true}

x-supernode-tls: &supernode-tls
<SUPERNODE_COMMAND>
x-clientapp-tls: &clientapp-tls
  command: ["sh", "-c", "exec flower-superexec --root-certificates /certificates/ca.crt --runtime-api-address $${SUPERNODE}:9094"]
  volumes: [*ca]

services:
  superlink:
<SUPERLINK_COMMAND>    ports: !override ["9091:9091"]  # every interface: remote SuperNodes and users connect here
    volumes:
      - *ca
<SERVER_FILES>
  serverapp:
    command: ["flower-superexec", "--root-certificates", "/certificates/ca.crt",
              "--runtime-api-address", "superlink:9091"]
    volumes: [*ca]
"""

TLS_NODE = """
  supernode-<I>:
    <<: *supernode-tls
    volumes:
      - *ca
<NODE_FILES>  clientapp-<I>: *clientapp-tls
"""

AUTH_HEAD = """\
# SuperNode authentication (Flower 1.41), on top of docker-compose.yml + docker-compose.tls.yml
# (the SuperLink refuses --enable-supernode-auth without TLS). Only SuperNodes whose public key was
# registered with `flwr supernode register` may connect; each proves its identity with its
# private key (--auth-supernode-private-key, an OpenSSH ECDSA key).
#
#   scripts/generate-certs.sh certificates
#   scripts/generate-supernode-keys.sh keys <NODES>
#   docker compose -f docker-compose.yml -f docker-compose.tls.yml -f docker-compose.auth.yml up -d --build
#   flwr supernode register keys/supernode-1.pub docker-tls     (once per node, see docs/deployment.md;
#   ...                                                          the SuperLink stores them in its database)
#
# Generated by `python -m fedsparse.deploy compose --nodes <N>`.

x-supernode-auth: &supernode-auth
<SUPERNODE_COMMAND>
services:
  superlink:
<SUPERLINK_COMMAND>
  # Each node gets only its own private key, read-only.
"""

AUTH_NODE = """\
  supernode-<I>:
    <<: *supernode-auth
    volumes: [<KEY>]
"""


def node_names(nodes: int) -> list[str]:
    return [f"supernode-{i}" for i in range(1, nodes + 1)]


def _fill(template: str, **values: str | int) -> str:
    for key, value in values.items():
        template = template.replace(f"<{key}>", str(value))
    return template


def scalar(value: str | int) -> str:
    """`value` as one YAML flow scalar, for Compose: PyYAML quotes it where YAML would misread it
    (`: `, `#`, `,`, a leading `*` or `@`, `yes`, a number) and leaves it plain otherwise; `$` is
    doubled so that Compose does not interpolate it."""
    if isinstance(value, str):
        if any(c in value for c in "\n\r\t\0"):
            raise ValueError(f"{value!r}: a path in a compose file cannot hold control characters")
        value = value.replace("$", "$$")
    return yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()[1:-1]


def host_path(path: str) -> str:
    """A host path as a bind mount source: a relative one gets `./`, so that no reader (nor Compose's
    short syntax) takes it for a named volume."""
    return path if path.startswith(("/", ".", "~")) else f"./{path}"


def _bind(source: str, target: str) -> str:
    return f"{{type: bind, source: {scalar(source)}, target: {target}, read_only: true}}"


def _cert_files(name: str) -> str:
    """List items mounting <name>.pem and <name>.key, each file on its own."""
    return "".join(
        f"      - {_bind(f'./certificates/{name}.{ext}', f'/certificates/{name}.{ext}')}\n"
        for ext in ("pem", "key")
    )


def _supernode_command(auth: bool) -> str:
    """The TLS SuperNode command; the auth override restates it whole (Compose replaces a
    `command`), adding the private-key flag."""
    key = "      --auth-supernode-private-key /run/secrets/supernode-key\n" if auth else ""
    return (
        "  command:\n    - sh\n    - -c\n    - >-\n"
        "      exec flower-supernode --root-certificates /certificates/ca.crt --superlink superlink:9091\n"
        f"{key}"
        "      --isolation process --host 0.0.0.0 --port 9094\n"
        "      --ssl-certfile /certificates/$${NODE}.pem --ssl-keyfile /certificates/$${NODE}.key\n"
        "      --ssl-ca-certfile /certificates/ca.crt\n"
        '      --node-config "partition-id=$${PARTITION_ID} num-partitions=$${NUM_PARTITIONS}'
        '$${NODE_CONFIG_EXTRA:+ $${NODE_CONFIG_EXTRA}}"\n'
    )


def _superlink_command(auth: bool) -> str:
    """The TLS SuperLink command, restated whole by the auth override with its extra flag."""
    flags = [
        '"--ssl-ca-certfile", "/certificates/ca.crt"',
        '"--ssl-certfile", "/certificates/server.pem"',
        '"--ssl-keyfile", "/certificates/server.key"',
        *(['"--enable-supernode-auth"'] if auth else []),
        '"--isolation", "process"',
        '"--host", "0.0.0.0", "--port", "9091"',
        '"--database", "/app/state/state.db"',
        '"--disable-runtime-dependency-installation"',
    ]
    return '    command: ["flower-superlink",\n' + ",\n".join(" " * 14 + f for f in flags) + "]\n"


def compose_files(nodes: int, data_root: str | None = None, context: str = ".") -> dict[str, str]:
    """File name -> text for `nodes` data owners. Without `data_root` each node partitions the
    bundled data on a named volume `node-i-data`; with it, node i reads its own GLUE directory
    `<data_root>/supernode-i` (a read-only bind mount, node config data-dir="/data"). Relative
    `data_root` and `context` are relative to the directory the files are written to."""
    if nodes < 1:
        raise ValueError("--nodes must be at least 1")
    names = node_names(nodes)
    base = _fill(BASE_HEAD, N=nodes, CONTEXT=scalar(context))
    tls, auth = (
        _fill(
            head,
            SUPERNODE_COMMAND=_supernode_command(auth),
            SUPERLINK_COMMAND=_superlink_command(auth),
            N=nodes,
            NODES=" ".join(names),
            SERVER_FILES=_cert_files("server"),
        )
        for head, auth in ((TLS_HEAD, False), (AUTH_HEAD, True))
    )
    volumes = ["superlink-state", "results", "server-data"]
    for pid, name in enumerate(names):
        i = pid + 1
        own = host_path(f"{data_root.rstrip('/')}/{name}") if data_root else None
        base += _fill(
            BASE_NODE,
            I=i,
            PID=pid,
            EXTRA=", NODE_CONFIG_EXTRA: 'data-dir=\"/data\"'" if own else "",
            DATA=_bind(own, "/data") if own else f'"node-{i}-data:/data"',
        )
        volumes += [] if own else [f"node-{i}-data"]
        tls += _fill(TLS_NODE, I=i, NODE_FILES=_cert_files(name))
        auth += _fill(AUTH_NODE, I=i, KEY=_bind(f"./keys/{name}", "/run/secrets/supernode-key"))
    base += "\nvolumes:\n" + "".join(f"  {v}:\n" for v in volumes)
    return dict(zip(FILES, (base, tls, auth)))


def write_compose(out: Path, nodes: int, data_root: str | None = None, context: str = ".") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in compose_files(nodes, data_root, context).items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsparse.deploy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    compose = sub.add_parser("compose", help="write the compose files for N data owners")
    compose.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (data owners)")
    compose.add_argument("--out", type=Path, default=Path("."), help="directory to write into (default .)")
    compose.add_argument(
        "--data-root",
        help="each node reads its own GLUE directory DATA_ROOT/supernode-i (bind mount, read-only; "
        "a relative path is relative to the current directory) instead of a partition of the bundled data",
    )
    compose.add_argument(
        "--context", help="Docker build context, relative to --out (default: the path from --out to cwd)"
    )
    args = parser.parse_args(argv)
    context = args.context or os.path.relpath(Path.cwd(), args.out.resolve())
    data_root = args.data_root
    if data_root and not data_root.startswith(("/", "~")):  # as typed, from here; the files, from --out
        data_root = os.path.relpath(Path(data_root).resolve(), args.out.resolve())
    for path in write_compose(args.out, args.nodes, data_root, context):
        print(f"wrote {path}")
    names = " ".join(node_names(args.nodes))
    print(f'certificates: SUPERNODES="{names}" scripts/generate-certs.sh certificates')
    print(f"node keys (auth): scripts/generate-supernode-keys.sh keys {names}")
