"""Results are never lost: a run killed mid-round resumes to the bit-identical final state of
an uninterrupted run, every round leaves a summary and a checkpoint on disk, a new run never
writes into another run's directory, and the merged model loads without fedsparse."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.federation import tiny
from harness.models import tiny_model
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from fedsparse.apps.simulation import run_simulation
from fedsparse.federation import checkpoint
from fedsparse.methods import build_method
from fedsparse.report.results import RunWriter, is_finished
from fedsparse.report.tables import load_runs
from fedsparse.run import CONFIG_SCHEMA_VERSION, ConfigError, compose_config, prepare

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
OVERRIDES = tiny(
    "federation.clients_per_round=2",
    "federation.rounds=3",
    "federation.strategy=fedavgm",  # the momentum must survive the interruption too
    "data.max_train_examples=300",
)


def _rounds(path) -> list[dict]:
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_ray):
    out = tmp_path_factory.mktemp("resume")
    return run_simulation(compose_config([*OVERRIDES, f"output_dir={out}", "run_name=whole"]))


@pytest.mark.integration
def test_a_killed_run_resumes_to_the_same_final_state(uninterrupted, tmp_path):
    cmd = [sys.executable, "-m", "fedsparse", *OVERRIDES, f"output_dir={tmp_path}", "run_name=killed"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 300
    try:
        while not (killed / "rounds.jsonl").exists() or len(_rounds(killed)) < 3:  # rounds 0, 1, 2
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before round 2"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its Ray workers, mid-round
        proc.wait()
    summary = json.loads((killed / "summary.json").read_text())
    assert not summary["finished"] and summary["rounds_done"] >= 1
    assert not is_finished(killed)
    assert load_runs([killed]) == ([], [killed])  # the report lists it as unfinished
    with pytest.raises(FileExistsError, match="resume="):  # a new run may not overwrite it
        run_simulation(compose_config([*OVERRIDES, f"output_dir={tmp_path}", "run_name=killed"]))

    run_simulation(prepare([f"resume={killed}"]))

    whole = checkpoint.load(uninterrupted)
    resumed = checkpoint.load(killed)
    assert resumed.round == whole.round == 3
    assert np.array_equal(resumed.values, whole.values)
    assert np.array_equal(resumed.strategy_state["momentum"], whole.strategy_state["momentum"])
    ours, theirs = _rounds(killed), _rounds(uninterrupted)
    assert [r["round"] for r in ours] == [0, 1, 2, 3]
    assert [(r["dev"], r["sampled"]) for r in ours] == [(r["dev"], r["sampled"]) for r in theirs]
    assert is_finished(killed)


@pytest.mark.integration
def test_the_merged_model_loads_without_fedsparse(uninterrupted):
    cfg = compose_config([*OVERRIDES, f"output_dir={uninterrupted.parent}", "run_name=whole"])
    method = build_method(tiny_model(), cfg.method)
    method.unpack(checkpoint.load(uninterrupted).values)
    stock = AutoModelForSequenceClassification.from_pretrained(uninterrupted / "model").eval()
    ids = torch.randint(1000, 2000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(stock(input_ids=ids).logits, expected)


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    first = checkpoint.Checkpoint(1, np.arange(4, dtype=np.float32), [{"round": 1}], {"m_t": np.ones(4)})
    checkpoint.save(tmp_path, first)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, checkpoint.Checkpoint(2, np.zeros(4, np.float32), [], {}))
    kept = checkpoint.load(tmp_path)
    assert kept.round == 1 and np.array_equal(kept.values, first.values)
    assert np.array_equal(kept.strategy_state["m_t"], np.ones(4))


def test_resume_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml"):
        prepare([f"resume={tmp_path}"])
    RunWriter(compose_config(["model=tiny", f"output_dir={tmp_path}", "run_name=r"]))
    with pytest.raises(ConfigError, match="checkpoint"):
        prepare([f"resume={tmp_path / 'r'}"])


# A config saved by an earlier version (committed): its key set, without today's later settings.
OLDER_CONFIG = RESULTS / "mask_ablation" / "pafi-smallest-d0.005-sst2-a1-lr0.02-s0-c52ec6" / "config.yaml"


def _keep_only(node: dict, keys: dict) -> dict:
    """`node` with only the keys `keys` has (recursively): a config as an older version saved it."""
    return {
        k: _keep_only(v, keys[k]) if isinstance(v, dict) and isinstance(keys[k], dict) else v
        for k, v in node.items()
        if k in keys
    }


@pytest.fixture
def killed_after_round_2(monkeypatch, tmp_path, shared_ray):
    """Run a simulation in this process and copy its directory as it stands right after round
    2's checkpoint: exactly what a run killed then leaves on disk. Returns (whole, killed)."""
    save = checkpoint.save
    killed = tmp_path / "killed"

    def save_and_copy(run_dir, state):
        path = save(run_dir, state)
        if state.round == 2:
            shutil.copytree(run_dir, killed)
        return path

    monkeypatch.setattr(checkpoint, "save", save_and_copy)

    def run(*overrides: str) -> tuple:
        whole = run_simulation(prepare([*OVERRIDES, *overrides, f"output_dir={tmp_path}", "run_name=whole"]))
        monkeypatch.setattr(checkpoint, "save", save)
        return whole, killed

    return run


def _assert_same_end(resumed, whole) -> None:
    ours, theirs = checkpoint.load(resumed), checkpoint.load(whole)
    assert ours.round == theirs.round == 3
    assert np.array_equal(ours.values, theirs.values)
    assert [(r["dev"], r["sampled"]) for r in _rounds(resumed)] == [
        (r["dev"], r["sampled"]) for r in _rounds(whole)
    ]


@pytest.mark.integration
def test_a_run_saved_by_an_older_version_resumes_bit_identically(killed_after_round_2):
    whole, killed = killed_after_round_2()
    older_keys = OmegaConf.to_container(OmegaConf.load(OLDER_CONFIG))
    saved = OmegaConf.to_container(OmegaConf.load(killed / "config.yaml"))
    OmegaConf.save(OmegaConf.create(_keep_only(saved, older_keys)), killed / "config.yaml")
    assert "min_replies" not in OmegaConf.load(killed / "config.yaml").federation  # an older layout

    run = prepare([f"resume={killed}"])
    assert run.cfg.federation.min_replies == 1 and run.cfg.privacy.dp == "none"  # today's defaults
    assert run.cfg.federation.strategy == "fedavgm" and run.cfg.schema_version == CONFIG_SCHEMA_VERSION
    run_simulation(run)
    _assert_same_end(killed, whole)
    assert OmegaConf.load(killed / "config.yaml").federation.min_replies == 1  # saved upgraded


@pytest.mark.integration
@pytest.mark.parametrize(
    "privacy",
    [
        ("privacy.dp=server", "privacy.noise_multiplier=0.5", "federation.strategy=fedavg"),
        ("privacy.secagg=true", "federation.strategy=fedavg"),
    ],
    ids=["central-dp", "secagg"],
)
def test_dp_and_secagg_runs_resume_bit_identically(killed_after_round_2, privacy):
    whole, killed = killed_after_round_2(*privacy, "federation.clients_per_round=3")
    run_simulation(prepare([f"resume={killed}"]))
    _assert_same_end(killed, whole)
    record = _rounds(killed)[-1]["privacy"]
    assert record["released"] if "privacy.dp=server" in privacy else record["clients"] == 3


@pytest.mark.integration
def test_a_resumed_run_may_extend_its_rounds_and_refuses_other_changes(killed_after_round_2, tmp_path):
    whole, killed = killed_after_round_2()
    with pytest.raises(ConfigError, match=r"train\.lr=0\.5 \(the run has"):
        prepare([f"resume={killed}", "train.lr=0.5"])
    # repeating the run's own overrides is not a change
    assert prepare([*OVERRIDES, f"resume={killed}"]).cfg.federation.strategy == "fedavgm"
    # a finished run is extended: round 4 runs on from the checkpoint of round 3
    run = prepare([f"resume={whole}", "federation.rounds=4"])
    assert run.done == 3 and not run.finished
    run_simulation(run)
    assert [r["round"] for r in _rounds(whole)] == [0, 1, 2, 3, 4] and is_finished(whole)
    assert prepare([f"resume={whole}", "federation.rounds=4"]).finished  # nothing left to run
    with pytest.raises(ConfigError, match="already completed 4 rounds"):
        prepare([f"resume={whole}", "federation.rounds=2"])


@pytest.mark.parametrize(
    "override, names",
    [
        ("federation.num_clients=0", "federation.num_clients=0: must be >= 1"),
        ("train.lr=-1", "train.lr=-1: must be > 0"),
        ("federation.min_replies=11", "federation.min_replies=11: must be between 1 and"),
        ("federation.nope=1", "unknown key federation.nope: federation has alpha, "),
        ("method=nope", "method=nope: use one of bitfit, full, hiwi, lora, pafi, topk"),
    ],
)
def test_config_errors_are_one_line_without_a_traceback(override, names, tmp_path):
    cmd = [sys.executable, "-m", "fedsparse", override, f"output_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], done.stderr
    assert not any(tmp_path.iterdir())  # nothing written
