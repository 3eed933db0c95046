"""Injected client faults never stop a run: failed or late replies are left out, and a round
below quorum is skipped with the global state unchanged."""

from __future__ import annotations

import json

import pytest
from harness.federation import tiny

from fedsparse.apps.simulation import run_simulation
from fedsparse.run import compose_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_ray")]  # one Ray head (harness)

# With seed 0 and fail_rate 0.3, exactly partition 2 fails, in round 1 only (faults.maybe_fail).
OVERRIDES = tiny("seed=0", "federation.fail_rate=0.3", "data.max_train_examples=300")


def _run(tmp_path, *overrides: str) -> tuple[list[dict], dict]:
    out = run_simulation(compose_config([*OVERRIDES, *overrides, f"output_dir={tmp_path}", "run_name=r"]))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return rounds, json.loads((out / "summary.json").read_text())


def test_a_failing_client_below_quorum_skips_the_round(tmp_path):
    rounds, summary = _run(tmp_path, "federation.rounds=2", "federation.min_replies=3")
    first, second = rounds[1], rounds[2]
    assert len(first["rejected"]) == 1 and "injected fault" in first["rejected"][0]
    assert "min_replies=3" in first["skipped"]
    assert first["dev"] == rounds[0]["dev"]  # the global state did not move
    assert second["skipped"] is None and second["rejected"] == []
    assert second["dev"] != first["dev"]
    assert summary["finished"] and summary["skipped_rounds"] == [1] and summary["rejected_replies"] == 1


def test_a_client_past_the_round_timeout_is_left_out(tmp_path):
    rounds, summary = _run(
        tmp_path, "federation.rounds=1", "federation.fail_mode=timeout", "federation.round_timeout=25"
    )
    comm = rounds[1]["comm"]
    assert rounds[1]["sampled"] == [0, 1, 2]
    assert comm["down"]["messages"] == 3 and comm["up"]["messages"] == 2  # the late reply never came
    assert [r.split(":", 1)[1] for r in rounds[1]["rejected"]] == [
        " no reply within federation.round_timeout=25 s"
    ]
    assert rounds[1]["skipped"] is None and summary["finished"]
