"""Flower ServerApp: samples clients, aggregates packed vectors, evaluates centrally on GLUE dev,
and writes the run directory (config, per-round JSON lines, summary)."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedsparse import privacy
from fedsparse.config import from_run_config
from fedsparse.data import TASKS, dev_split
from fedsparse.methods import Method, build_method
from fedsparse.metrics import main_metric
from fedsparse.model import load_model, load_tokenizer
from fedsparse.report import format_comm_table, format_round, plot_runs
from fedsparse.results import RunWriter
from fedsparse.sampling import ClientSampler
from fedsparse.strategy import STRATEGIES, CommLedger, PackedState, wire_bytes
from fedsparse.train import evaluate, make_loader


def make_strategy(cfg: DictConfig, method: Method, ledger: CommLedger) -> PackedState:
    fed = cfg.federation
    sampler = ClientSampler(cfg.seed, fed.clients_per_round, fed.num_clients, fed.wait_timeout)
    # The sampler picks the clients; Flower's own sampling then sees only them (fraction 1.0).
    kwargs = dict(
        fraction_train=1.0,
        min_train_nodes=1,
        fraction_evaluate=1.0 if fed.evaluate_clients else 0.0,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    if fed.strategy == "fedavgm":
        kwargs.update(server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)
    elif fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_lr_adam, eta_l=cfg.train.lr)
    return STRATEGIES[fed.strategy](
        method=method, ledger=ledger, sampler=sampler, lr_decay=float(cfg.train.lr_decay), **kwargs
    )


def full_model_bytes(num_parameters: int) -> int:
    """Wire size of one message carrying every model parameter: the `full` reference."""
    content = RecordDict({"arrays": ArrayRecord({"values": Array(np.zeros(num_parameters, np.float32))})})
    return wire_bytes(Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN))


def run_server(grid: Grid, cfg: DictConfig) -> dict:
    """One federated run; returns the summary that is also written to summary.json."""
    task = cfg.task.name
    model = load_model(cfg.model.name, TASKS[task].num_labels, cfg.seed)
    num_parameters = sum(p.numel() for p in model.parameters())
    method = build_method(model, cfg.method)
    dev_loader = make_loader(
        dev_split(cfg),
        load_tokenizer(cfg.model.name),
        cfg.data.max_length,
        cfg.train.eval_batch_size,
        shuffle=False,
    )
    ledger = CommLedger(method.head_size)
    strategy = make_strategy(cfg, method, ledger)
    runner = privacy.wrap(strategy, cfg)  # the strategy itself unless DP or SecAgg+ is on
    writer = RunWriter(cfg)
    full_bytes = full_model_bytes(num_parameters)
    metric = main_metric(task)
    fed = cfg.federation
    print(
        f"fedsparse: {cfg.method.name} on {task} ({cfg.model.name}), {fed.num_clients} clients, "
        f"{fed.clients_per_round}/round, {fed.rounds} rounds, {fed.partitioner} alpha={fed.alpha}; "
        f"{method.num_values():,} values per message; results -> {writer.dir}",
        flush=True,
    )
    start = time.time()
    history: list[dict] = []
    cumulative = 0

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal cumulative
        method.unpack(arrays["values"].numpy())
        metrics = evaluate(method.model, dev_loader, task)
        comm = ledger.summary(server_round)
        cumulative += comm["total_bytes"]
        record = {
            "round": server_round,
            "dev": metrics,
            "comm": comm,
            "cumulative_bytes": cumulative,
            "ratio_to_full": comm["up"]["per_client"] / full_bytes,
            "train": dict(strategy.train_metrics.get(server_round, {})),
            "client_eval": dict(strategy.client_eval.get(server_round, {})),
            "rejected": strategy.rejected.get(server_round, []),
            "sampled": strategy.sampler.sampled.get((server_round, "train"), []),
            "wall_seconds": time.time() - start,
            **privacy.round_record(cfg, runner, server_round),
        }
        writer.add_round(record)
        history.append(record)
        print(format_round(record, fed.rounds, metric), flush=True)
        return MetricRecord(metrics)

    train_config = ConfigRecord(
        {
            "lr": float(cfg.train.lr),
            "batch-size": int(cfg.train.batch_size),
            "local-steps": int(cfg.train.local_steps or 0),
            "local-epochs": float(cfg.train.local_epochs or 0.0),
        }
    )
    runner.start(
        grid=grid,
        initial_arrays=ArrayRecord({"values": Array(method.initial_state())}),
        num_rounds=fed.rounds,
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    final = history[-1]
    summary = {
        "mode": "federated",
        "method": cfg.method.name,
        "task": task,
        "model": cfg.model.name,
        "rounds": fed.rounds,
        "metric": metric,
        "final": final["dev"],
        "best": max((h["dev"][metric] for h in history[1:]), default=None),
        "values_per_message": method.num_values(),
        "trainable_values": method.num_trainable(),
        "head_values": method.head_size,
        "model_parameters": num_parameters,
        "full_model_message_bytes": full_bytes,
        "fingerprint": method.fingerprint(),
        "bytes_down": sum(h["comm"][d]["bytes"] for h in history for d in ("down", "eval_down")),
        "bytes_up": sum(h["comm"][d]["bytes"] for h in history for d in ("up", "eval_up")),
        "mean_up_per_client": float(np.mean([h["comm"]["up"]["per_client"] for h in history[1:]])),
        "mean_down_per_client": float(np.mean([h["comm"]["down"]["per_client"] for h in history[1:]])),
        "rejected_replies": sum(len(h["rejected"]) for h in history),
        "wall_seconds": time.time() - start,
    }
    writer.write_summary(summary)
    print(format_comm_table(history), flush=True)
    run = {
        "dir": str(writer.dir),
        "summary": summary,
        "rounds": history,
        "config": OmegaConf.to_container(cfg),
    }
    plots = plot_runs([run], writer.dir)
    print(f"results: {writer.dir}\nplots: {', '.join(str(p) for p in plots)}", flush=True)
    return summary


def make_server_app(cfg: DictConfig | None = None) -> ServerApp:
    """A ServerApp bound to `cfg` (simulation), or reading the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg if cfg is not None else from_run_config(context.run_config))

    return app


app = make_server_app()
