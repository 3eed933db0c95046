"""Flower ClientApp: answers the server's partition query, trains and evaluates on this node's shard.

In a deployment Flower starts a fresh process for every message, so this module imports no
torch or transformers: a partition query and the SecAgg+ stages that do not train stay cheap,
and only a train or evaluate message loads the model (`fedsparse.apps.client_train`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedsparse.config import client_config
from fedsparse.federation.sampling import partition_reply
from fedsparse.privacy import dp


def make_client_app(cfg: DictConfig | None = None) -> ClientApp:
    """A ClientApp bound to `cfg` (simulation: the server's own config; its clients follow the
    `federation.client_gpus` rule of `client_train.client_device`), or composing it from the run
    config (deployment: `train.device` on the SuperNode's own GPUs)."""
    app = ClientApp()

    def resolve(context: Context) -> DictConfig:
        return cfg if cfg is not None else client_config(context.run_config)

    @app.train(mods=[dp.client_mod(resolve)])  # SecAgg+ and client-side DP, when configured
    def _train(msg: Message, context: Context) -> Message:
        from fedsparse.apps.client_train import handle_train  # torch: only where a message trains

        return handle_train(msg, context, resolve(context), simulated=cfg is not None)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return partition_reply(msg, context.node_config)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        from fedsparse.apps.client_train import handle_evaluate

        return handle_evaluate(msg, context, resolve(context), simulated=cfg is not None)

    return app


app = make_client_app()
