"""shards.json: every run directory records its clients' shards, simulated or deployed."""

from __future__ import annotations

import json
from collections import Counter

from omegaconf import OmegaConf

from fedsparse.apps.client_train import client_shard
from fedsparse.data.glue import describe_shards
from fedsparse.run import compose_config

SMOKE = ["+experiment=smoke", "run_name=r"]


def test_the_servers_shards_are_what_each_deployed_node_trains_on(tmp_path, capsys):
    """What a deployed ServerApp writes (`deployed=True`) is each SuperNode's shard: the data its
    ClientApp loads from its node config `partition-id=i num-partitions=N`."""
    cfg = compose_config([*SMOKE, f"output_dir={tmp_path}"])
    written = describe_shards(cfg, tmp_path / "r", deployed=True)
    assert json.loads((tmp_path / "r" / "shards.json").read_text()) == written
    assert "as the SuperNodes' partition-id/num-partitions select them" in capsys.readouterr().out
    n = cfg.federation.num_clients
    for i in range(n):
        loader = client_shard(cfg, {"partition-id": i, "num-partitions": n}, batch_size=8)
        labels = Counter(int(label) for _, label in loader.dataset)
        assert written["sizes"][i] == len(loader.dataset)
        assert written["labels"][i] == [labels[k] for k in range(len(written["labels"][i]))]
    assert describe_shards(cfg, tmp_path / "sim") == written  # a simulation writes the same file


def test_a_deployed_server_without_the_training_split_says_so_and_runs_on(tmp_path, capsys):
    """A server whose data.glue_dir holds only the dev files (docs/deployment.md) writes nothing."""
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    cfg = compose_config([*SMOKE, "task=rte", f"data.glue_dir={tmp_path / 'glue'}", f"output_dir={tmp_path}"])
    assert describe_shards(cfg, tmp_path / "r", deployed=True) is None
    out = capsys.readouterr().out
    assert out.startswith("No shards.json: the server cannot read the training split") and "train.tsv" in out
    assert not (tmp_path / "r").exists()


def test_a_deployed_server_leaves_another_runs_directory_alone(tmp_path):
    cfg = compose_config([*SMOKE, f"output_dir={tmp_path}"])
    (tmp_path / "r").mkdir()
    OmegaConf.save(cfg, tmp_path / "r" / "config.yaml")  # another run by that name: RunWriter refuses it
    assert describe_shards(cfg, tmp_path / "r", deployed=True) is None
    assert not (tmp_path / "r" / "shards.json").exists()
    resumed = compose_config([*SMOKE, f"output_dir={tmp_path}", f"resume={tmp_path / 'r'}"])
    assert describe_shards(resumed, tmp_path / "r", deployed=True) is not None  # its own: rewritten
