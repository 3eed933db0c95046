"""Index bytes of one top-k uplink message under each `method.index_encoding` (MiniLM by default).

    python experiments/topk_index_encoding.py [--model minilm] [--steps 30] [--out experiments/results/topk_index_encoding.md]

Two index sets of the same k (PaFi's budget, density 0.5% of the attention + FFN weights):
`trained`, the top-k of a real client's change after one round of local training (client 0 of
10, Dirichlet 1.0 shard of the bundled SST-2, `--steps` AdamW steps of batch 16 at lr 5e-5, the rate the committed results used),
and `uniform`, k indices drawn uniformly at random (the top-k of i.i.d. random changes). Each
is encoded by `TopK.encode`, decoded back exactly, and measured as arrays and as the serialized
Flower ArrayRecord, next to PaFi's ArrayRecord on the same model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import write_result
from flwr.app import Array, ArrayRecord
from flwr.common.serde import array_record_to_proto

from fedsparse.apps.client_train import client_shard
from fedsparse.methods import build_method
from fedsparse.methods.index_codec import CODECS
from fedsparse.methods.model import load_model
from fedsparse.run import compose_config
from fedsparse.training.train import train

TOPK_LR = 5e-5  # topk's default before it became the methods suite's 2e-4: the committed figures used it


def record_bytes(wire: dict[str, np.ndarray]) -> int:
    return array_record_to_proto(ArrayRecord({k: Array(v) for k, v in wire.items()})).ByteSize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="experiments/results/topk_index_encoding.md")
    args = parser.parse_args()

    cfg = compose_config(["method=topk", f"model.name={args.model}"])
    pafi = build_method(
        load_model(args.model, 2, 0), compose_config(["method=pafi", f"model.name={args.model}"]).method
    )
    pafi_bytes = record_bytes(pafi.encode(pafi.pack()))
    topk = build_method(load_model(args.model, 2, 0), cfg.method)
    start = time.time()
    received = topk.initial_state().copy()
    loader = client_shard(cfg, {"partition-id": 0, "num-partitions": 10}, int(cfg.train.batch_size))
    train(topk, loader, TOPK_LR, steps=args.steps, weight_decay=float(cfg.train.weight_decay))
    trained = topk.pack()
    train_s = time.time() - start
    rng = np.random.default_rng(0)
    uniform = received.copy()
    uniform[: topk.body_size] += rng.normal(0, 1e-3, topk.body_size).astype(np.float32)

    k, n = topk.k, topk.body_size
    lines = [
        f"Model {args.model}: k = {k:,} of {n:,} candidate entries (density {k / n:.3%}), "
        f"head {topk.head_size} values; PaFi's ArrayRecord {pafi_bytes:,} bytes.",
        f"`trained`: top-k of client 0's change after {args.steps} local steps ({train_s:.0f}s); "
        "`uniform`: top-k of i.i.d. Gaussian changes. Payload = the serialized ArrayRecord "
        "(values + indices + array metadata); the message adds about 0.5 KB of header for every method. "
        "Times are for the whole `TopK.encode` (including the top-k selection over all candidates) "
        "and `TopK.decode`, on a shared 2-core CPU.",
        "",
        "| index set | encoding | index bytes | bytes per index | payload bytes | ratio to PaFi | encode ms | decode ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, vector in (("trained", trained), ("uniform", uniform)):
        index = None
        for name, codec in CODECS.items():
            topk.codec = codec  # what method.index_encoding=<name> selects
            t0 = time.perf_counter()
            wire = topk.encode(vector, reference=received)
            t1 = time.perf_counter()
            decoded = topk.decode(wire, received)
            t2 = time.perf_counter()
            sent = np.flatnonzero(decoded[:n] != received[:n])
            index = codec.decode(wire["indices"], n)
            assert index.size == k and np.isin(sent, index).all()
            size = wire["indices"].nbytes
            lines.append(
                f"| {label} | {name} | {size:,} | {size / k:.3f} | {record_bytes(wire):,} | "
                f"{record_bytes(wire) / pafi_bytes:.3f} | {1e3 * (t1 - t0):.1f} | {1e3 * (t2 - t1):.1f} |"
            )
        gaps = np.diff(index, prepend=-1) - 1
        lines.append(
            f"| {label} | (gaps: median {np.median(gaps):.0f}, mean {gaps.mean():.0f}, "
            f"{(gaps < 128).mean():.0%} below 128) | | | | | | |"
        )
    write_result("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
