"""The same apps through `flwr run` on a local simulation SuperLink (real processes)."""

from __future__ import annotations

import json

import pytest
from harness.federation import tiny
from harness.loopback import running_superlink

from fedsparse.deploy.loopback import flwr_run

pytestmark = pytest.mark.integration


def test_flwr_run_on_a_local_simulation_federation(tmp_path):
    out = tmp_path / "results"
    with running_superlink(tmp_path, "local-sim", simulation=True) as link:  # stopped, nothing left
        settings = " ".join(tiny(f"output_dir={out}", "run_name=flwr-run"))
        run = flwr_run("local-sim", settings, link.env, federation_config="num-supernodes=3")
        assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "flwr-run" / "summary.json").read_text())
    rounds = (out / "flwr-run" / "rounds.jsonl").read_text().splitlines()
    assert summary["method"] == "pafi" and summary["rounds"] == 2 and len(rounds) == 3
    assert json.loads(rounds[-1])["comm"]["up"]["messages"] == 3
    assert "[round 2/2]" in run.stdout  # per-round progress is streamed back
