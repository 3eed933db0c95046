"""Federated runs in Flower's simulation engine on the tiny model: state, bytes, results."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from harness.federation import tiny
from harness.models import SHARED_GLUE

from fedsparse.apps.simulation import run_simulation
from fedsparse.federation.strategy import PackedStrategy
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model
from fedsparse.report.results import read_run
from fedsparse.run import compose_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_ray")]  # one Ray head (harness)

BASE = tiny("federation.client_cpus=1")
# a budget large enough that the head and the message header do not dominate the payload
METHOD_OPTIONS = {"pafi": ["method.density=0.2"], "topk": ["method.density=0.2"]}


@pytest.fixture(scope="module")
def captured():
    """Every aggregation: the decoded replies (values, weight) and the aggregate."""
    calls = []
    original = PackedStrategy.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = original(self, server_round, replies)
        kept = [
            (r.content["arrays"]["values"].numpy().copy(), r.content["metrics"]["num-examples"])
            for r in replies
            if not r.has_error()
            and "values" in r.content["arrays"]
            and r.content["arrays"]["values"].numpy().size == self.global_values.size
        ]
        calls.append(
            {
                "method": self.method.name,
                "replies": kept,
                "aggregate": None if arrays is None else arrays["values"].numpy().copy(),
            }
        )
        return arrays, metrics

    PackedStrategy.aggregate_train = spy
    yield calls
    PackedStrategy.aggregate_train = original


@pytest.fixture(scope="module")
def runs(tmp_path_factory, captured):
    """One 2-round, 3-client simulation per method (shared by the tests below)."""
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for name in ("pafi", "hiwi", "full", "bitfit", "lora", "topk"):
        cfg = compose_config(
            BASE + [f"method={name}", f"output_dir={out}", f"run_name={name}"] + METHOD_OPTIONS.get(name, [])
        )
        done[name] = (cfg, run_simulation(cfg))
    return done


def _load(run):
    cfg, path = run
    return cfg, *read_run(path)


@pytest.mark.parametrize("name", ["pafi", "hiwi", "full", "bitfit", "lora", "topk"])
def test_every_round_is_recorded_and_the_global_state_moves(runs, captured, name):
    cfg, config, rounds, summary = _load(runs[name])
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert config["method"]["name"] == name and summary["rounds"] == 2
    for r in rounds[1:]:
        assert r["comm"]["up"]["messages"] == 3 and r["comm"]["down"]["messages"] == 3
        assert r["train"]["train-loss"] > 0 and not r["rejected"]
        assert 0.0 <= r["dev"]["accuracy"] <= 1.0
    assert rounds[2]["cumulative_bytes"] > rounds[1]["cumulative_bytes"] > 0
    aggregates = [c["aggregate"] for c in captured if c["method"] == name]
    assert len(aggregates) == 2
    method = build_method(load_model("tiny-bert", 2, cfg.seed), cfg.method)
    assert not np.array_equal(aggregates[-1], method.initial_state())


@pytest.mark.parametrize("name", ["pafi", "full", "topk"])
def test_aggregate_is_the_weighted_mean_of_the_replies(runs, captured, name):
    for call in (c for c in captured if c["method"] == name):
        values = np.stack([v for v, _ in call["replies"]]).astype(np.float64)
        weights = np.array([w for _, w in call["replies"]], dtype=np.float64)
        expected = (values * weights[:, None]).sum(0) / weights.sum()
        np.testing.assert_allclose(call["aggregate"], expected, atol=1e-6, rtol=1e-6)
        assert len(set(weights)) > 1  # non-IID shards differ in size: the weighting matters


def test_pafi_global_model_differs_from_pretrained_only_at_masked_entries(runs, captured):
    cfg, _ = runs["pafi"]
    pretrained = load_model("tiny-bert", 2, cfg.seed)
    before = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    method = build_method(load_model("tiny-bert", 2, cfg.seed), cfg.method)
    method.unpack([c for c in captured if c["method"] == "pafi"][-1]["aggregate"])
    masked = dict(zip(method.mask.names, method.mask.indices))
    merged = method.merge()
    moved = 0
    for name, p in merged.named_parameters():
        if name.startswith("classifier"):
            continue
        diff = (p.detach() != before[name]).reshape(-1)
        allowed = torch.zeros_like(diff)
        if name in masked:
            allowed[masked[name]] = True
        assert not (diff & ~allowed).any(), name
        moved += int(diff.sum())
    assert moved > 0


def test_uplink_bytes_match_the_payload(runs):
    _, _, pafi_rounds, pafi = _load(runs["pafi"])
    header = None
    for r in pafi_rounds[1:]:
        up = r["comm"]["up"]
        per_client = up["bytes"] / up["messages"]
        payload = 4 * pafi["values_per_message"]
        assert up["values"] + up["head"] == payload * up["messages"] and up["indices"] == 0
        overhead = per_client - payload
        assert 0 < overhead < 0.01 * payload + 1024  # within 1% of the bound plus a constant header
        header = overhead if header is None else header
        assert abs(overhead - header) < 64  # constant across rounds
    _, _, topk_rounds, topk = _load(runs["topk"])
    assert topk["values_per_message"] == pafi["values_per_message"]  # same budget
    assert topk["mean_up_per_client"] >= 1.9 * pafi["mean_up_per_client"]
    assert all(r["comm"]["up"]["indices"] > 0 for r in topk_rounds[1:])
    # the downlink carries at most the union of last round's supports, not rounding noise
    k = topk_rounds[1]["comm"]["up"]["indices"] // (4 * 3)
    assert topk_rounds[2]["comm"]["down"]["indices"] // 3 <= 4 * 3 * k
    _, _, full_rounds, full = _load(runs["full"])
    params = 4 * full["model_parameters"]
    for r in full_rounds[1:]:
        per_client = r["comm"]["up"]["per_client"]
        assert params <= per_client < params + 2048
        assert r["comm"]["up"]["values"] + r["comm"]["up"]["head"] == params * 3


# Per-round bytes of the runs above (3 clients, `BASE`), measured on commit 54867a5, before the
# accounting moved out of the strategy: {method: [(down, up, query) of round 1, of round 2]}.
PINNED_BYTES = {
    "pafi": [(41_434, 41_692, 638), (41_434, 41_692, 0)],
    "hiwi": [(26_689, 26_947, 644), (26_689, 26_947, 0)],
    "full": [(11_991_017, 11_991_275, 646), (11_991_017, 11_991_275, 0)],
    "bitfit": [(9_794, 10_052, 646), (9_794, 10_052, 0)],
    "lora": [(26_685, 26_943, 636), (26_685, 26_943, 0)],
    "topk": [(2_624, 81_545, 646), (185_345, 81_545, 0)],
}
# Each message carries two random 64-bit integers, the run id and a node id, that Flower draws anew
# for every simulation; as protobuf varints they take 1 to 10 bytes, so the same message's size
# varies by up to 2 * 9 bytes between two runs. Nothing else in these messages varies in size.
VARINT_SLACK = 2 * 9


def test_round_bytes_are_pinned(runs):
    for name, pinned in PINNED_BYTES.items():
        _, _, rounds, _ = _load(runs[name])
        measured = [
            (r["comm"]["down"]["bytes"], r["comm"]["up"]["bytes"], r["comm"]["query_bytes"])
            for r in rounds[1:]
        ]
        for server_round, (now, then) in enumerate(zip(measured, pinned, strict=True), start=1):
            queries = 2 * 3 if server_round == 1 else 0  # one query to and from each node, once
            for got, want, messages in zip(now, then, (3, 3, queries), strict=True):
                assert abs(got - want) <= VARINT_SLACK * messages, (name, server_round, now, then)


def test_summary_and_rounds_are_plain_json(runs):
    for _, path in runs.values():
        summary = json.loads((path / "summary.json").read_text())
        assert summary["bytes_up"] > 0 and summary["final"]["accuracy"] >= 0
        for line in (path / "rounds.jsonl").read_text().splitlines():
            json.loads(line)


def test_report_compares_runs_and_writes_plots(runs, tmp_path, capsys):
    from fedsparse.report.cli import main as report_main

    report_main([str(path) for _, path in runs.values()] + ["--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()  # the run table first: one row per run
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[2 : 2 + len(runs)]]
    for name, (_, path) in runs.items():  # each run's row carries that run's own figures
        summary = json.loads((path / "summary.json").read_text())
        (row,) = [r for r in rows if r["method"] == name or r["method"].startswith(f"{name}[")]
        assert row["task"] == "sst2" and row["values/msg"] == f"{summary['values_per_message']:,}"
        assert row["final metric"] == f"{summary['final'][summary.get('metric') or 'accuracy']:.4f}"
    for png in ("bytes_per_round.png", "metric_vs_bytes.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_optional_client_side_evaluation_is_recorded(tmp_path):
    cfg = compose_config(BASE + ["federation.evaluate_clients=true", f"output_dir={tmp_path}", "run_name=ce"])
    _, rounds, _ = read_run(run_simulation(cfg))
    for r in rounds[1:]:
        assert 0.0 <= r["client_eval"]["shard-train-accuracy"] <= 1.0  # on the training shards
        comm = r["comm"]
        assert comm["down"]["messages"] == comm["eval_down"]["messages"] == comm["eval_up"]["messages"] == 3
        assert (
            comm["eval_down"]["values"] + comm["eval_down"]["head"]
            == comm["down"]["values"] + comm["down"]["head"]
        )
        directions = sum(comm[d]["bytes"] for d in ("down", "up", "eval_down", "eval_up"))
        assert comm["total_bytes"] == directions + comm["query_bytes"]
    # the one-off partition-id queries (a message to and from each node) are counted in round 1
    assert rounds[1]["comm"]["query_bytes"] > 0 and rounds[2]["comm"]["query_bytes"] == 0
    assert (tmp_path / "ce" / "bytes_per_round.png").exists()


@pytest.mark.skipif(not SHARED_GLUE.exists(), reason="needs the GLUE TSVs beside the repo")
def test_a_nodes_data_dir_is_its_whole_training_set():
    from fedsparse.apps.client_train import client_shard

    cfg = compose_config(
        [
            "model=tiny",
            "task=rte",
            "federation.num_clients=2",
            "federation.clients_per_round=2",
            "data.max_length=32",
        ]
    )
    shards = [
        client_shard(cfg, {"partition-id": i, "num-partitions": 2, "data-dir": str(SHARED_GLUE)}, 8)
        for i in range(2)
    ]
    assert [len(s.dataset) for s in shards] == [2_490, 2_490]  # each owner keeps all of RTE train
    # the same directory as the run's configured data source is split between the nodes
    cfg.data.glue_dir = str(SHARED_GLUE)
    split = [len(client_shard(cfg, {"partition-id": i, "num-partitions": 2}, 8).dataset) for i in range(2)]
    assert sum(split) == 2_490 and max(split) < 2_490
    with pytest.raises(ValueError, match="partition-id"):
        client_shard(cfg, {"data-dir": str(SHARED_GLUE)}, 8)
