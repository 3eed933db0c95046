"""SecAgg+ on the packed update, through Flower 1.41's only SecAgg+ implementation (`privacy.secagg`).

Flower runs SecAgg+ only in its legacy workflow stack (`SecAggPlusWorkflow` inside a
`DefaultWorkflow`, calling a legacy `Strategy`); the Message-API strategies cannot. This module
bridges the two without a second copy of the round logic:

- server: `_LegacyBridge` is the legacy strategy. `configure_fit` asks the packed strategy for the
  round's messages (client sampling, lr schedule, fingerprint) and turns them into `FitIns`;
  `aggregate_fit` checks each client on its clear-text FitRes (fingerprint, metrics, its own
  num-examples) and counts the valid ones against the strategy's quorum, then hands the unmasked
  *sum* to the packed strategy, whose server optimiser and metrics apply unchanged.
- client: `secagg_mod` runs Flower's `secaggplus_mod` around the Message-API train handler and
  converts between the legacy records and ours. A client sends its update (reply minus the
  global vector it received), not its weights: SecAgg+ clips every entry to
  [-clipping_range, clipping_range] after scaling by num-examples / max_weight, and updates are
  small where weights are not.
- bytes: every SecAgg+ message (four round trips per round) is measured on the packed strategy's
  metered grid; the masked-vector exchange counts as the round's `train` messages (its upload is
  the int64 masked vector), the other stages as `secagg-*`.

Precision: the sum is quantised with step 2 * clipping_range / quantization_range on each
client's scaled update; the mean's error is at most about n * step / sum(n_i / max_weight)
per entry, hence max_weight = the largest shard (see docs/privacy.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedsparse.federation.protocol import FINGERPRINT_KEY, INFO_KEY, METRICS_KEY, TRAIN_METRICS, WEIGHT_KEY
from fedsparse.federation.strategy import PackedStrategy
from fedsparse.federation.validation import masked_reply_problem

log = logging.getLogger("fedsparse")
ROUNDING_SALT = 0x5EC  # keeps the rounding stream apart from other draws keyed by (seed, round, partition)


class _LegacyBridge(LegacyStrategy):
    """The legacy strategy SecAgg+ calls, delegating every decision to the packed strategy."""

    def __init__(self, packed: PackedStrategy, grid: Grid, initial: ArrayRecord, train_config, evaluate_fn):
        self.packed = packed
        self.grid = grid
        self.initial = initial
        self.train_config = train_config or ConfigRecord()
        self.evaluate_fn = evaluate_fn
        self.round = 0
        self.notes: dict[
            int, dict
        ] = {}  # round (counting resumed ones) -> clients, clipped entries, failures

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([self.initial["values"].numpy()])

    def configure_fit(self, server_round, parameters, client_manager):
        self.round = server_round + getattr(self.packed, "round_offset", 0)
        arrays = ArrayRecord({"values": Array(parameters_to_ndarrays(parameters)[0].astype(np.float32))})
        messages = self.packed.configure_train(server_round, arrays, self.train_config, self.grid)
        proxies = {p.node_id: p for p in client_manager.all().values()}
        out = []
        for m in messages:
            wire = m.content[self.packed.arrayrecord_key]
            fitins = FitIns(ndarrays_to_parameters([wire["values"].numpy()]), dict(m.content["config"]))
            out.append((proxies[m.metadata.dst_node_id], fitins))
        return out

    def aggregate_fit(self, server_round, results, failures):
        packed, note = self.packed, self.notes.setdefault(self.round, {})
        note.update(clients=len(results), failures=[str(f) for f in failures])
        note["clipped_entries"] = int(sum(res.metrics.get("secagg-clipped", 0) for _, res in results))
        rejected = 0
        for proxy, res in results:  # each client's num-examples and metrics travel in clear text
            problem = masked_reply_problem(
                res.num_examples,
                res.metrics,
                fingerprint=packed.fingerprint,
                max_examples=packed.max_examples,
            )
            if problem:
                packed.reject(self.round, proxy.node_id, problem)
                rejected += 1
        if not packed.has_quorum(self.round, len(results) - rejected):
            return None, {}
        if rejected:  # their masked updates are in the sum, and cannot be taken out of it
            packed.skip(self.round, f"the secure sum includes {rejected} rejected updates")
            return None, {}
        n = np.array([res.num_examples for _, res in results], dtype=np.float64)
        mean = parameters_to_ndarrays(results[0][1].parameters)[0]  # every result holds the same sum
        metrics = {WEIGHT_KEY: int(n.sum())}
        for key in TRAIN_METRICS[1:]:  # all but the weight
            metrics[key] = float(np.dot(n, [float(res.metrics[key]) for _, res in results]) / n.sum())
        values = (packed.global_values.astype(np.float64) + mean).astype(np.float32)
        arrays, _ = packed.aggregate_mean(server_round, values, metrics)
        if arrays is None:
            return None, {}
        return ndarrays_to_parameters([arrays["values"].numpy()]), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        if self.evaluate_fn is None:
            return None
        values = parameters_to_ndarrays(parameters)[0].astype(np.float32)
        metrics = self.evaluate_fn(server_round, ArrayRecord({"values": Array(values)}))
        return (float(metrics.get("loss", 0.0)), dict(metrics)) if metrics is not None else None


class SecAggRunner:
    """Runs the packed strategy's rounds through SecAgg+; `start` matches `Strategy.start`."""

    def __init__(self, strategy: PackedStrategy, cfg: DictConfig, max_weight: float):
        """`max_weight`: `privacy.secagg_max_weight`, or where that is null the largest shard (the
        caller reads the data: privacy does not)."""
        if tuple(strategy.method.wire_keys) != ("values",):
            raise ValueError(
                f"SecAgg+ sums one dense vector; {strategy.method.name} sends {strategy.method.wire_keys}"
            )
        p = cfg.privacy
        self.strategy = strategy
        self.max_weight = float(max_weight)
        self.workflow = SecAggPlusWorkflow(
            num_shares=float(p.secagg_num_shares),
            reconstruction_threshold=float(p.secagg_threshold),
            max_weight=self.max_weight,
            clipping_range=float(p.secagg_clipping_range),
            quantization_range=int(p.secagg_quantization_range),
            timeout=float(cfg.federation.wait_timeout),
        )
        self.bridge: _LegacyBridge | None = None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        train_config=None,
        evaluate_fn=None,
        timeout: float | None = None,
    ) -> None:
        """`timeout`: seconds each SecAgg+ stage waits for replies (federation.round_timeout)."""
        if timeout is not None:
            self.workflow.timeout = timeout
        metered = self.strategy.metered(grid, waiting=False)  # the sampler's queries, every SecAgg+ message
        self.bridge = _LegacyBridge(self.strategy, metered, initial_arrays, train_config, evaluate_fn)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=num_rounds), strategy=self.bridge)
        DefaultWorkflow(fit_workflow=self.workflow)(metered, legacy)

    def round_record(self, server_round: int) -> dict:
        """SecAgg+ settings, per-stage bytes and what the clients clipped, for rounds.jsonl
        (`server_round` counts the rounds of a resumed run, as the ledger does)."""
        stages: dict[str, dict] = {}
        for e in self.strategy.ledger.rounds.get(server_round, []):
            if e["kind"] == "train" or e["kind"].startswith("secagg-"):
                s = stages.setdefault(e["kind"], {"down": 0, "up": 0, "messages": 0})
                s[e["direction"]] += e["bytes"]
                s["messages"] += 1
        w = self.workflow
        return {
            "secagg_stages": stages,
            "secagg_extra_bytes": sum(v["down"] + v["up"] for k, v in stages.items() if k != "train"),
            "max_weight": self.max_weight,
            "clipping_range": w.clipping_range,
            "quantization_range": w.quantization_range,
            **(self.bridge.notes.get(server_round, {}) if self.bridge else {}),
        }


def secagg_mod(msg: Message, ctxt: Context, call_next: Callable, seed: int) -> Message:
    """Client side: Flower's `secaggplus_mod` for SecAgg+ messages (both protocols send TRAIN
    messages; only SecAgg+ ones carry its config record), everything else passes through.

    Flower's stochastic rounding of the update draws from numpy's global generator; it is seeded
    from (seed, round, partition) just before the rounding (`_legacy_train`) and the caller's
    global state is restored afterwards, so a resumed run rounds exactly as the uninterrupted run
    and nothing else in the process draws from a publicly seeded state."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    saved = np.random.get_state()
    try:
        return secaggplus_mod(msg, ctxt, lambda m, c: _legacy_train(m, c, call_next, seed))
    finally:
        np.random.set_state(saved)


def _legacy_train(msg: Message, ctxt: Context, call_next: Callable, seed: int) -> Message:
    """FitIns -> our train message -> the handler -> FitRes carrying the update."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    received = parameters_to_ndarrays(fitins.parameters)[0]
    msg.content = RecordDict(
        {"arrays": ArrayRecord({"values": Array(received)}), "config": ConfigRecord(fitins.config)}
    )
    reply = call_next(msg, ctxt)
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")
    update = reply.content["arrays"]["values"].numpy() - received
    metrics = dict(reply.content[METRICS_KEY])
    n = int(metrics.pop("num-examples"))
    state = ctxt.state.config_records[RECORD_KEY_STATE]
    max_weight, clip = float(state["max_weight"]), float(state["clipping_range"])
    if n > max_weight:
        raise ValueError(
            f"num-examples {n} exceeds the SecAgg+ max_weight {max_weight:g}: the masked sum would "
            "overflow. Set privacy.secagg_max_weight to at least the largest client's example count."
        )
    metrics["secagg-clipped"] = int(np.count_nonzero(np.abs(update) * (n / max_weight) > clip))
    if metrics["secagg-clipped"]:
        log.warning(
            "SecAgg+: %d update entries exceed clipping_range %g and are clipped",
            metrics["secagg-clipped"],
            clip,
        )
    metrics[FINGERPRINT_KEY] = str(reply.content[INFO_KEY][FINGERPRINT_KEY])
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([update]), n, metrics)
    rounding = np.random.SeedSequence(
        [seed, int(fitins.config["server-round"]), int(ctxt.node_config["partition-id"]), ROUNDING_SALT]
    )
    np.random.set_state(np.random.RandomState(np.random.MT19937(rounding)).get_state())
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
