"""Results are never lost: a run killed mid-round resumes to the bit-identical final state of
an uninterrupted run, every round leaves a summary and a checkpoint on disk, a new run never
writes into another run's directory, and the merged model loads without fedsparse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForSequenceClassification

from fedsparse import checkpoint
from fedsparse.config import compose_config
from fedsparse.methods import build_method
from fedsparse.results import RunWriter, is_finished
from fedsparse.simulation import run_simulation
from fedsparse.tables import load_runs

pytestmark = pytest.mark.usefixtures("shared_ray")  # simulations attach to one Ray head (conftest)

OVERRIDES = [
    "model=tiny",
    "federation.num_clients=3",
    "federation.clients_per_round=2",
    "federation.rounds=3",
    "federation.strategy=fedavgm",  # the momentum must survive the interruption too
    "train.local_steps=2",
    "train.batch_size=8",
    "data.max_train_examples=300",
    "data.max_eval_examples=32",
    "data.max_length=32",
]


def _rounds(path) -> list[dict]:
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    return run_simulation(compose_config([*OVERRIDES, f"output_dir={out}", "run_name=whole"]))


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

    run_simulation(checkpoint.resume_config(killed))

    whole = checkpoint.load(uninterrupted)
    resumed = checkpoint.load(killed)
    assert resumed.round == whole.round == 3
    assert np.array_equal(resumed.values, whole.values)
    assert np.array_equal(resumed.strategy_state["momentum"], whole.strategy_state["momentum"])
    ours, theirs = _rounds(killed), _rounds(uninterrupted)
    assert [r["round"] for r in ours] == [0, 1, 2, 3]
    assert [(r["dev"], r["sampled"]) for r in ours] == [(r["dev"], r["sampled"]) for r in theirs]
    assert is_finished(killed)


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
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        checkpoint.resume_config(tmp_path)
    RunWriter(compose_config(["model=tiny", f"output_dir={tmp_path}", "run_name=r"]))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        checkpoint.load(tmp_path / "r")
