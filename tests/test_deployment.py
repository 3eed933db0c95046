"""Deployment on loopback: a real SuperLink and two SuperNodes (the commands the containers
run), driven by `flwr run`, compared with a simulation of the same seed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from harness.loopback import (
    assert_matches_simulation,
    assert_setup_paid_per_message,
    assert_socket_bytes,
    deploy_tiny,
)

from fedsparse.deploy.loopback import ROOT

pytestmark = pytest.mark.integration


# The three checks below read the session's one plaintext deployment (harness.fixtures).
def test_loopback_deployment_matches_simulation(loopback_deployment, simulated):
    assert_matches_simulation(loopback_deployment.run_dir, simulated)


def test_loopback_socket_bytes_are_the_accounted_bytes_plus_flowers_overhead(loopback_deployment):
    assert_socket_bytes(loopback_deployment.run_dir, loopback_deployment.socket)


def test_a_deployment_pays_the_client_setup_on_every_message(loopback_deployment, simulated):
    assert_setup_paid_per_message(loopback_deployment.run_dir, simulated)


def test_loopback_socket_bytes_full_finetuning(tmp_path):
    """Full fine-tuning of the tiny model (8 MB per message): socket bytes within the same bound."""
    done = deploy_tiny(tmp_path, rounds=1, extra=("method=full",))
    assert_socket_bytes(done.run_dir, done.socket)


def test_loopback_deployment_with_tls(tmp_path, simulated):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot generate certificates")
    certs = tmp_path / "certificates"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(certs)], check=True, capture_output=True
    )
    done = deploy_tiny(tmp_path, tls=certs)  # also: the same SuperLink refuses a plaintext client
    assert_matches_simulation(done.run_dir, simulated)
    assert_socket_bytes(done.run_dir, done.socket)
