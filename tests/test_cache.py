"""The node-local disk cache (fedsparse.data.cache): same results as recomputing, corruption is
ignored and rebuilt, and the key follows everything the cached content depends on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from harness.models import method_cfg, tiny_model
from omegaconf import OmegaConf

from fedsparse.apps.client_train import _shard, client_shard, shard_entry
from fedsparse.data import cache
from fedsparse.methods.base import checkpoint_digest
from fedsparse.methods.model import load_tokenizer
from fedsparse.methods.pafi import cached_mask, compute_mask
from fedsparse.run import compose_config

PAFI = {"density": 0.05}
NODE = {"partition-id": 1, "num-partitions": 3}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDSPARSE_CACHE", raising=False)
    _shard.cache_clear()
    yield tmp_path / "cache"
    _shard.cache_clear()


@pytest.fixture
def glue(tmp_path) -> Path:
    """A small SST-2 train.tsv in GLUE's layout (parsing the bundled 67k rows takes seconds)."""
    rows = [f"{'a fine' if i % 2 else 'a dull'} film number {i}\t{i % 2}" for i in range(60)]
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return tmp_path / "glue"


def _cfg(glue: Path, *overrides: str):
    return compose_config(
        [
            "model=tiny",
            f"data.glue_dir={glue}",
            "federation.partitioner=iid",
            "federation.num_clients=3",
            "federation.clients_per_round=3",
            *overrides,
        ]
    )


def _mask(cfg=None):
    model = tiny_model()
    return cached_mask(model, checkpoint_digest(model), cfg or method_cfg("pafi", **PAFI))


def _entries(root: Path, kind: str) -> list[Path]:
    return sorted(root.glob(f"{kind}-*.npz"))


def _rows(loader) -> tuple[list, list]:
    return [f["input_ids"] for f, _ in loader.dataset], [int(y) for _, y in loader.dataset]


def test_cached_mask_equals_the_computed_one_cold_and_warm(cache_dir):
    cfg = method_cfg("pafi", **PAFI)
    reference = compute_mask(tiny_model(), cfg.density, cfg.scope, cfg.select, cfg.groups, cfg.seed)
    for _ in range(2):  # the first call writes the entry, the second reads it
        mask = _mask()
        assert mask.fingerprint == reference.fingerprint and mask.names == reference.names
        assert all(torch.equal(a, b) for a, b in zip(mask.indices, reference.indices))
    assert len(_entries(cache_dir, "pafi-mask")) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-indices"])
def test_a_damaged_mask_entry_is_ignored_and_rebuilt(cache_dir, damage):
    reference = _mask()
    (path,) = _entries(cache_dir, "pafi-mask")
    if damage == "garbage":
        path.write_bytes(b"not an npz")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # a well-formed entry (valid checksum) whose indices fall outside their tensor
        arrays = cache.load(path.stem)
        arrays["i0"] = arrays["i0"] + 10**9
        cache.save(path.stem, arrays)
    mask = _mask()
    assert mask.fingerprint == reference.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(mask.indices, reference.indices))
    assert cache.load(path.stem) is not None  # rebuilt


def test_mask_key_follows_the_settings_and_the_checkpoint(cache_dir):
    _mask()
    _mask(method_cfg("pafi", density=0.02))
    _mask(method_cfg("pafi", **PAFI, groups="attention"))
    model = tiny_model(seed=1)  # another checkpoint (the tiny model's weights come from the seed)
    cached_mask(model, checkpoint_digest(model), method_cfg("pafi", **PAFI))
    assert len(_entries(cache_dir, "pafi-mask")) == 4


def test_cached_shard_equals_the_uncached_one(cache_dir, glue, monkeypatch):
    cfg = _cfg(glue)
    cold, warm = _rows(client_shard(cfg, NODE, 8)), None
    _shard.cache_clear()
    warm = _rows(client_shard(cfg, NODE, 8))
    monkeypatch.setenv("FEDSPARSE_CACHE", "off")
    _shard.cache_clear()
    off = _rows(client_shard(cfg, NODE, 8))
    assert cold == warm == off and len(off[0]) > 0
    assert len(_entries(cache_dir, "shard")) == 1


def test_a_damaged_shard_entry_is_ignored_and_rebuilt(cache_dir, glue):
    cfg = _cfg(glue)
    reference = _rows(client_shard(cfg, NODE, 8))
    (path,) = _entries(cache_dir, "shard")
    arrays = cache.load(path.stem)
    arrays["input_ids.offsets"] = arrays["input_ids.offsets"][:-1]  # checksum fine, shape wrong
    cache.save(path.stem, arrays)
    _shard.cache_clear()
    assert _rows(client_shard(cfg, NODE, 8)) == reference
    path.write_bytes(path.read_bytes()[:-100])  # torn file
    _shard.cache_clear()
    assert _rows(client_shard(cfg, NODE, 8)) == reference


def test_shard_key_follows_data_partitioning_and_tokenizer(cache_dir, glue):
    base, tok = _cfg(glue), load_tokenizer("tiny-bert")

    def entry(partition_id=1, source="dir", **changes):
        cfg = base.copy()
        for key, value in changes.items():
            OmegaConf.update(cfg, key.replace("__", "."), value)
        return shard_entry(cfg, source, str(glue), 3, partition_id, tok)

    keys = [
        entry(),
        entry(partition_id=2),
        entry(data__max_length=32),
        entry(data__max_train_examples=30),
        entry(federation__partitioner="dirichlet"),
        entry(federation__min_partition_size=5),
        entry(seed=1),
    ]
    assert entry(federation__rounds=3) == keys[0]  # settings that leave the shard alone
    assert entry(source="hub") is None  # nothing local to key by: not cached
    with (glue / "SST-2" / "train.tsv").open("a") as f:  # the data owner edits the file
        f.write("one more film\t1\n")
    keys.append(entry())
    tok.add_tokens(["filmnumber"])  # another tokenizer definition
    keys.append(entry())
    assert len(set(keys)) == len(keys)


def test_disabled_cache_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_CACHE", "off")
    _mask()
    assert cache.cache_dir() is None and not cache_dir.exists()
    assert cache.load("anything") is None


def test_entries_are_written_atomically(cache_dir):
    cache.save("x", {"a": np.arange(3)})
    assert [p.name for p in cache_dir.iterdir()] == ["x.npz"]  # no temporary file left behind
    assert np.array_equal(cache.load("x")["a"], np.arange(3))
