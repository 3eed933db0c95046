"""Flower ServerApp: samples clients, aggregates packed vectors, evaluates centrally on GLUE dev,
and writes the run directory (config, per-round JSON lines, summary, checkpoint, merged model)."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedsparse.apps.client_state import RUN_KEY
from fedsparse.apps.recorder import RoundRecorder
from fedsparse.config import run_key
from fedsparse.data.glue import TASKS, describe_shards, dev_split, largest_shard
from fedsparse.federation.accounting import CommLedger, full_model_bytes
from fedsparse.federation.sampling import ClientSampler
from fedsparse.federation.strategy import STRATEGIES, PackedStrategy
from fedsparse.federation.waiting import WaitRule
from fedsparse.methods import Method, build_method
from fedsparse.methods.device import resolve_device
from fedsparse.methods.model import load_model, load_tokenizer
from fedsparse.privacy import dp
from fedsparse.run import NOISE, Run, prepare_from_run_config
from fedsparse.training.train import make_loader


def make_strategy(cfg: DictConfig, method: Method, ledger: CommLedger) -> PackedStrategy:
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
    elif fed.strategy == "fedprox":
        kwargs.update(proximal_mu=float(fed.proximal_mu))
    return STRATEGIES[fed.strategy](
        method=method,
        ledger=ledger,
        sampler=sampler,
        lr_decay=float(cfg.train.lr_decay),
        min_replies=int(fed.min_replies),
        max_examples=int(fed.max_examples),
        compression=cfg.get("compression"),
        seed=int(cfg.seed),
        run_key=run_key(cfg),
        wait_rule=WaitRule(int(fed.min_replies), float(fed.grace_factor), float(fed.grace_min)),
        **kwargs,
    )


def run_server(grid: Grid, run: Run) -> dict:
    """One federated run (or the rest of one: `run.resumed`); returns the summary that is also
    written to summary.json."""
    cfg = run.cfg
    task = cfg.task.name
    model = load_model(cfg.model.name, TASKS[task].num_labels, cfg.seed)
    # built on the host (mask, fingerprint), evaluated on train.device
    method = build_method(model, cfg.method)
    method.to(resolve_device(cfg.train.get("device", "auto")))
    dev_loader = make_loader(
        dev_split(cfg),
        load_tokenizer(cfg.model.name),
        cfg.data.max_length,
        cfg.train.eval_batch_size,
        shuffle=False,
    )
    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    # the strategy itself unless DP or SecAgg+ is on
    p = cfg.privacy
    max_weight = float(p.secagg_max_weight or largest_shard(cfg)) if p.secagg else None
    runner = dp.wrap(strategy, cfg, run.generators[NOISE], max_weight)
    run.restore(strategy, runner)
    recorder = RoundRecorder(
        run,
        method,
        strategy,
        dev_loader,
        full_model_bytes(sum(p.numel() for p in model.parameters())),
        extra_fields=lambda server_round: dp.round_record(cfg, runner, server_round),
    )
    fed = cfg.federation
    print(
        f"fedsparse: {cfg.method.name} on {task} ({cfg.model.name}), {fed.num_clients} clients, "
        f"{fed.clients_per_round}/round, {fed.rounds} rounds, {fed.partitioner} alpha={fed.alpha}; "
        f"{method.num_values():,} values per message; results -> {recorder.dir}"
        + (f"; resuming after round {run.done}" if run.resumed else ""),
        flush=True,
    )
    train_config = ConfigRecord(
        {
            "lr": float(cfg.train.lr),
            "batch-size": int(cfg.train.batch_size),
            "local-steps": int(cfg.train.local_steps or 0),
            "local-epochs": float(cfg.train.local_epochs or 0.0),
        }
    )
    if strategy.compression:  # names the clients' residual store (apps.client_state)
        train_config[RUN_KEY] = run_key(cfg)
    runner.start(
        grid=grid,
        initial_arrays=ArrayRecord({"values": Array(recorder.start_values)}),
        num_rounds=fed.rounds - run.done,
        timeout=float(fed.round_timeout),
        train_config=train_config,
        evaluate_fn=recorder.evaluate,
    )
    return recorder.finish()


def make_server_app(run: Run | None = None) -> ServerApp:
    """A ServerApp bound to `run` (simulation), or preparing its run from the run config
    (deployment: `flwr run . --run-config 'overrides="..."'`)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        this = run if run is not None else prepare_from_run_config(context.run_config)
        if this.finished:
            print(f"skip: {this.dir} is finished with this configuration", flush=True)
            return
        if run is None:  # deployed (a simulation wrote shards.json before it started)
            describe_shards(this.cfg, this.dir, deployed=True)
        run_server(grid, this)

    return app


app = make_server_app()
