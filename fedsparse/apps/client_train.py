"""The ClientApp's work on a train or evaluate message: fine-tune only the shared trainable state
on this node's GLUE shard, or evaluate the global state on it.

The frozen pre-trained model is loaded once per process and cached; each message carries only
the packed trainable state and a small config (round, lr, local steps, batch size, method
fingerprint). A client whose checkpoint or method settings give another fingerprint refuses to
train.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import time

import numpy as np
import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedsparse.apps.client_state import HELD_KEY, downlink, uplink
from fedsparse.data import cache
from fedsparse.data.glue import TASKS, partition, source_file, train_split
from fedsparse.federation import faults
from fedsparse.federation.compression import downlink_bits, global_digest
from fedsparse.federation.protocol import INFO_KEY, METRICS_KEY
from fedsparse.methods import Method, build_method
from fedsparse.methods.device import device_problem, resolve_device
from fedsparse.methods.model import load_model, load_tokenizer
from fedsparse.run import ConfigError
from fedsparse.training.train import client_seed, encode, encoded_loader, evaluate, train


@functools.lru_cache(maxsize=1)
def _method(model_name: str, task: str, seed: int, method_yaml: str, device: str) -> Method:
    """One model per process, whatever the number of clients this process serves: built on the
    host (mask and fingerprint are the host's), then moved to `device`."""
    model = load_model(model_name, TASKS[task].num_labels, seed)
    return build_method(model, OmegaConf.create(method_yaml)).to(device)


def client_device(cfg: DictConfig, simulated: bool = False) -> torch.device:
    """Where this client trains: `train.device`, resolved against the GPUs this process sees (a
    SuperNode's own; a simulated client's Ray actor sees the GPU Ray gave it). A simulated client
    with `federation.client_gpus=0` has no GPU of its own (Ray leaves every GPU visible to such an
    actor, see `simulation.set_ray_defaults`), so it trains on the CPU, and `cuda` is refused."""
    setting = str(cfg.train.get("device", "auto"))
    if simulated and not cfg.federation.get("client_gpus", 0):
        if setting.startswith("cuda"):
            raise ConfigError(
                f"train.device={setting}: simulated clients get no GPU with federation.client_gpus=0; "
                "set federation.client_gpus (e.g. 0.25) or train.device=auto|cpu"
            )
        return torch.device("cpu")
    problem = device_problem(setting)
    if problem:
        raise ConfigError(f"{problem} (on this client)")
    return resolve_device(setting)


def client_method(cfg: DictConfig, simulated: bool = False) -> Method:
    device = str(client_device(cfg, simulated))
    return _method(cfg.model.name, cfg.task.name, int(cfg.seed), OmegaConf.to_yaml(cfg.method), device)


def shard_entry(
    cfg: DictConfig,
    source: str,
    glue_dir: str | None,
    num_partitions: int | None,
    partition_id: int,
    tokenizer: PreTrainedTokenizerBase,
) -> str | None:
    """The disk-cache entry of a tokenised shard, keyed by everything the shard depends on: the
    data file's bytes, the data settings, the partitioning, the seed and the tokenizer's full
    definition. None (not cached) for hub data (no local file) or a slow tokenizer."""
    data_file = source_file(cfg.task.name, "train", source, glue_dir)
    if data_file is None or not tokenizer.is_fast:
        return None
    fed = cfg.federation
    return cache.key(
        "shard",
        data=OmegaConf.to_container(cfg.data, resolve=True),
        task=cfg.task.name,
        seed=int(cfg.seed),
        partitioning=[fed.partitioner, float(fed.alpha), int(fed.min_partition_size)],
        partition=[source, num_partitions, partition_id],
        file=cache.file_digest(data_file),
        tokenizer=hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
    )


@functools.lru_cache(maxsize=16)
def _shard(
    data_yaml: str,
    source: str,
    glue_dir: str | None,
    num_partitions: int | None,
    partition_id: int,
    batch_size: int,
) -> DataLoader:
    """Partition `partition_id` of `num_partitions` of the train split (None: all of it),
    tokenised through the node's disk cache: a deployment process serves one message, so this
    lru_cache only hits in simulation."""
    cfg = OmegaConf.create(data_yaml)
    fed = cfg.federation
    tokenizer = load_tokenizer(cfg.model.name)

    def tokenised_shard() -> cache.Encoding:
        shard = train_split(cfg, source, glue_dir)
        if num_partitions is not None:
            shard = partition(
                shard,
                num_partitions,
                partition_id,
                fed.partitioner,
                float(fed.alpha),
                int(cfg.seed),
                int(fed.min_partition_size),
            )
        return encode(shard, tokenizer, int(cfg.data.max_length))

    entry = shard_entry(cfg, source, glue_dir, num_partitions, partition_id, tokenizer)
    encoded, labels = cache.cached_encoding(entry, tokenised_shard)
    return encoded_loader(
        encoded, labels, tokenizer, batch_size, shuffle=True, seed=int(cfg.seed) + partition_id
    )


def client_shard(cfg: DictConfig, node_config: dict, batch_size: int) -> DataLoader:
    """This node's training data, from its node config: partition `partition-id` of
    `num-partitions` of the configured data, or with `data-dir` the whole train split of that
    data owner's own GLUE directory (splitting it would discard most of the owner's data)."""
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError("The SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>'.")
    source, glue_dir = cfg.data.source, cfg.data.glue_dir
    num_partitions: int | None = int(node_config["num-partitions"])
    if "data-dir" in node_config:
        source, glue_dir, num_partitions = "dir", str(node_config["data-dir"]), None
    relevant = OmegaConf.to_yaml({k: cfg[k] for k in ("data", "federation", "model", "task", "seed")})
    return _shard(
        relevant, source, glue_dir, num_partitions, int(node_config["partition-id"]), int(batch_size)
    )


def _receive(
    method: Method, msg: Message, cfg: DictConfig, partition: int
) -> tuple[np.ndarray, ConfigRecord]:
    """Check the fingerprint, then load the received global state (rebuilt from a compressed
    downlink: `client_state.downlink`) into the model."""
    config = msg.content["config"]
    if config["fingerprint"] != method.fingerprint():
        raise RuntimeError(
            "Refusing to train: this client's method fingerprint "
            f"{method.fingerprint()[:12]} differs from the server's "
            f"{str(config['fingerprint'])[:12]}. Both must load the same checkpoint "
            "with the same method settings."
        )
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    received = downlink(cfg, method, arrays, config, partition)
    method.unpack(received)
    return received, config


_MESSAGES_SERVED = itertools.count()


def _arrival() -> float:
    """When this message's work began: for the first message a process serves, the process start
    (a deployment's fresh ClientApp process pays its imports and model load), else now."""
    return psutil.Process().create_time() if next(_MESSAGES_SERVED) == 0 else time.time()


def handle_train(msg: Message, context: Context, cfg: DictConfig, simulated: bool = False) -> Message:
    arrival = _arrival()
    method = client_method(cfg, simulated)
    received, config = _receive(method, msg, cfg, int(context.node_config["partition-id"]))
    faults.maybe_fail(cfg, int(config["server-round"]), int(context.node_config["partition-id"]))
    loader = client_shard(cfg, context.node_config, int(config["batch-size"]))
    start = time.time()
    seed = client_seed(int(cfg.seed), int(config["server-round"]), int(context.node_config["partition-id"]))
    loss = train(
        method,
        loader,
        float(config["lr"]),
        steps=int(config["local-steps"]) or None,
        epochs=float(config["local-epochs"]) or None,
        weight_decay=float(cfg.train.weight_decay),
        seed=seed,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # sent by federation.strategy=fedprox
        # absent from the configs of runs saved before it existed (resume=)
        head_lr_scale=float(cfg.train.get("head_lr_scale", 1.0)),
        precision=str(cfg.train.get("precision", "fp32")),
    )
    wire = uplink(cfg, method, received, config, int(context.node_config["partition-id"]))
    metrics = {
        "num-examples": len(loader.dataset),
        "train-loss": loss,
        "train-seconds": time.time() - start,
        "setup-seconds": start - arrival,
    }
    info = {"fingerprint": method.fingerprint()}
    if downlink_bits(cfg):  # which global this node holds: the server's base for its next downlink
        info[HELD_KEY] = global_digest(received).hex()
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in wire.items()}),
            METRICS_KEY: MetricRecord(metrics),
            INFO_KEY: ConfigRecord(info),
        }
    )
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: DictConfig, simulated: bool = False) -> Message:
    """Optional client-side evaluation of the global state on this node's training shard (no
    held-out data on a node), hence the `shard-train-` keys: not a validation metric."""
    method = client_method(cfg, simulated)
    _receive(method, msg, cfg, int(context.node_config["partition-id"]))
    loader = client_shard(cfg, context.node_config, int(cfg.train.eval_batch_size))
    metrics = evaluate(method.model, loader, cfg.task.name, str(cfg.train.get("precision", "fp32")))
    record = {f"shard-train-{k}": v for k, v in metrics.items()}
    record["num-examples"] = len(loader.dataset)
    return Message(content=RecordDict({METRICS_KEY: MetricRecord(record)}), reply_to=msg)
