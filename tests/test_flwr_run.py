"""The same apps through `flwr run` on a local simulation SuperLink (real processes)."""

from __future__ import annotations

import json

import pytest
from harness.federation import tiny

from fedsparse.deploy.loopback import (
    flower_env,
    flwr_run,
    free_port,
    leftovers,
    processes,
    superlink_argv,
    wait_for_port,
    write_connection,
)

pytestmark = pytest.mark.integration


def test_flwr_run_on_a_local_simulation_federation(tmp_path):
    home, port = tmp_path / "flwr-home", free_port()
    write_connection(home, "local-sim", port)
    env = flower_env(home)
    out = tmp_path / "results"
    with processes(tmp_path, home) as start:
        link = start("superlink", superlink_argv(port, simulation=True), env)
        wait_for_port(port, link)
        settings = " ".join(tiny(f"output_dir={out}", "run_name=flwr-run"))
        run = flwr_run("local-sim", settings, env, federation_config="num-supernodes=3")
        assert run.returncode == 0, run.stdout + run.stderr
    assert link.poll() is not None and leftovers(home) == []  # everything it started is stopped
    summary = json.loads((out / "flwr-run" / "summary.json").read_text())
    rounds = (out / "flwr-run" / "rounds.jsonl").read_text().splitlines()
    assert summary["method"] == "pafi" and summary["rounds"] == 2 and len(rounds) == 3
    assert json.loads(rounds[-1])["comm"]["up"]["messages"] == 3
    assert "[round 2/2]" in run.stdout  # per-round progress is streamed back
