"""SecAgg+ bytes and quantisation error at the demo's scale, in seconds (no training).

One SecAgg+ round of PaFi on MiniLM (53,854 values) with N clients, through the real server
bridge and client mods on fedsparse.apps.inprocess's in-memory grid (every message serialized
as a deployment would). Training is replaced by a random update (std 0.01) and a random
num-examples in 1000..9999, since neither bytes nor the quantisation bound depend on training.
Compares with plain FedAvg of the very same replies.

    python experiments/secagg_bytes.py [--clients 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import write_result
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsparse.apps.inprocess import InProcessGrid, wire_copy
from fedsparse.apps.server_app import make_strategy
from fedsparse.federation.accounting import CommLedger, wire_bytes
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model
from fedsparse.privacy.secagg import SecAggRunner
from fedsparse.run import compose_config

# what the ServerApp sends with each TRAIN message (the values do not matter: training is replaced)
TRAIN_CONFIG = ConfigRecord({"lr": 2e-2, "batch-size": 8, "local-steps": 2, "local-epochs": 0.0})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    n = parser.parse_args().clients
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # messages outside an app
    fed = [f"federation.num_clients={n}", f"federation.clients_per_round={n}"]
    cfg = compose_config([*fed, "privacy.secagg=true", "privacy.secagg_max_weight=10000"])
    method = build_method(load_model(cfg.model.name, 2, cfg.seed), cfg.method)
    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    grid, rng, secure = InProcessGrid(cfg), np.random.default_rng(0), []

    def train(msg: Message, _ctxt) -> Message:
        values = msg.content["arrays"]["values"].numpy()
        content = RecordDict(
            {
                "arrays": ArrayRecord(
                    {"values": Array((values + rng.normal(0, 0.01, values.size)).astype(np.float32))}
                ),
                "metrics": MetricRecord(
                    {
                        "num-examples": int(rng.integers(1000, 10000)),
                        "train-loss": 0.5,
                        "train-seconds": 1.0,
                        "setup-seconds": 0.5,
                    }
                ),
                "info": ConfigRecord({"fingerprint": method.fingerprint()}),
            }
        )
        reply = Message(content=content, reply_to=msg)
        grid.trained.append(wire_copy(reply))
        return reply

    def keep(server_round, replies, aggregate=strategy._aggregate):  # what SecAggRunner calls with the sum
        arrays, metrics = aggregate(server_round, replies)
        secure.append(arrays["values"].numpy().astype(np.float64))
        return arrays, metrics

    grid._train, strategy._aggregate = train, keep
    runner = SecAggRunner(strategy, cfg, cfg.privacy.secagg_max_weight)
    initial = ArrayRecord({"values": Array(method.initial_state())})
    runner.start(grid=grid, initial_arrays=initial, num_rounds=1, train_config=TRAIN_CONFIG)
    plain = make_strategy(cfg, method, CommLedger(method.head_size))
    plain.global_values = method.initial_state()
    expected, _ = plain.aggregate_train(1, [wire_copy(r) for r in grid.trained])
    error = np.abs(secure[0] - expected["values"].numpy())
    record, summary = runner.round_record(1), strategy.ledger.summary(1)
    plain_up = float(np.mean([wire_bytes(r) for r in grid.trained]))
    lines = [f"SecAgg+ round, PaFi on MiniLM ({method.num_values():,} values), {n} clients, max_weight 10000"]
    for stage, s in record["secagg_stages"].items():
        lines.append(
            f"  {stage:28} down {s['down']:>10,} B   up {s['up']:>10,} B   ({s['messages']} messages)"
        )
    lines += [
        f"upload per client: {summary['up']['per_client']:,.0f} B masked vs {plain_up:,.0f} B plain "
        f"({summary['up']['per_client'] / plain_up:.2f}x)",
        f"key exchange (setup, share keys, unmask): {record['secagg_extra_bytes']:,} B per round",
        f"secure mean vs plain FedAvg of the same replies: max abs error {error.max():.2e}, mean {error.mean():.2e}",
    ]
    write_result("\n".join(lines), Path(__file__).parent / "results" / "secagg_bytes.txt")


if __name__ == "__main__":
    main()
