"""Simulation beyond one machine: attach the simulation engine to an existing Ray cluster
(`ray start --head` here on 127.0.0.1; other machines would join with `ray start --address`)."""

from __future__ import annotations

import pytest
from harness.ray_head import cluster_processes, ray_head

from fedsparse.apps.simulation import backend_config, run_simulation
from fedsparse.report.results import read_run
from fedsparse.run import compose_config


@pytest.mark.integration
def test_simulation_attaches_to_a_running_ray_head(tmp_path):
    with ray_head() as (address, temp_dir):
        cfg = compose_config(
            [
                "+experiment=smoke",
                f"federation.ray_address={address}",
                f"output_dir={tmp_path}",
                "run_name=on-cluster",
            ]
        )
        _, rounds, summary = read_run(run_simulation(cfg))
        assert len(rounds) == 3 and summary["rounds"] == 2
        # the clients ran as workers of this cluster: its session logged our driver and actors
        logs = list((temp_dir / "session_latest" / "logs").glob("*"))
        assert any("driver" in p.name for p in logs) and any("worker" in p.name for p in logs)
    assert not cluster_processes(temp_dir)


def test_ray_address_in_the_environment_attaches_too(monkeypatch):
    cfg = compose_config(["+experiment=smoke"])
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert backend_config(cfg)["init_args"] == {"address": "10.0.0.7:6379"}
    explicit = compose_config(["+experiment=smoke", "federation.ray_address=127.0.0.1:1"])
    assert backend_config(explicit)["init_args"] == {"address": "127.0.0.1:1"}  # the setting wins
    monkeypatch.delenv("RAY_ADDRESS")
    assert "num_cpus" in backend_config(cfg)["init_args"]  # else a cluster of its own
