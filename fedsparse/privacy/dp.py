"""Differential privacy on the packed vector, with Flower's own DP pieces (`privacy.dp`).

Every message carries exactly one array, the packed vector "values", and a client's update is
its reply minus the global vector it received, so Flower's wrappers and mods clip and noise
exactly the trained state:

- `server`: `DifferentialPrivacyServerSideFixedClipping`; the server clips each update to
  `clipping_norm` (L2) and adds N(0, (noise_multiplier * clipping_norm / n)^2) to the mean of n.
- `client`: `DifferentialPrivacyClientSideFixedClipping` + the client's `fixedclipping_mod`; the
  server checks that every update respects the norm (it cannot make a client clip).
- `local`: `LocalDpMod` on each client (clip, then Gaussian noise before the update leaves it).

Central DP needs an unweighted mean (DP-FedAvg): with weights n_i / sum(n) a client's clipped
update moves the mean by up to C * max(n_i) / sum(n), more than the C / n the noise is scaled
for, so each accepted reply's `num-examples` is set to 1. A round is released (aggregated,
noised, accounted) only when all `clients_per_round` sampled clients sent valid replies; if one
fails or is rejected the round is skipped and the global state stays, as Flower's wrappers do
on client errors. Epsilon is tracked with Flower's `RdpAccountant` (dp-accounting), per round;
a resumed run replays the releases recorded in its history into a fresh accountant, so epsilon
continues from where the interrupted run stopped. The noise is drawn from a generator seeded
from OS entropy at the start of the run, never from the public `seed`; its state is kept in the
checkpoint only, so a resumed run continues the same noise (and the checkpoint is a secret).
Adaptive clipping is not offered: in Flower 1.41 its update moves the norm the wrong way (see
docs/privacy.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv
from omegaconf import DictConfig

from fedsparse.federation.protocol import METRICS_KEY
from fedsparse.federation.strategy import PackedStrategy
from fedsparse.privacy.secagg import SecAggRunner, secagg_mod

DP_MODES = ("none", "server", "client", "local")
CENTRAL = ("server", "client")
Mod = Callable[[Message, Context, Callable], Message]


def config_problems(cfg: DictConfig) -> list[str]:
    """Combinations that would silently give a wrong or non-private result, each with why."""
    p = cfg.get("privacy")
    if p is None:
        return []
    problems = []
    if p.dp not in DP_MODES:
        problems.append(f"privacy.dp={p.dp}: use one of {DP_MODES}")
    method = cfg.method.name
    if p.secagg and method == "topk":
        problems.append(
            "privacy.secagg=true cannot be used with method=topk: each top-k client sends values at "
            "its own indices, and SecAgg+ can only sum vectors over the same entries; the server "
            "would need every client's indices in the clear (revealing what each client changed) or "
            "a dense upload (no longer top-k). Use a shared-support method (pafi, hiwi, bitfit, lora, full)"
        )
    if p.dp != "none" and method == "topk":
        problems.append(
            "privacy.dp cannot be used with method=topk: the DP wrappers clip and noise every array "
            "of a reply, and a top-k reply's indices are not part of the update"
        )
    if p.dp in CENTRAL and cfg.federation.strategy not in ("fedavg", "fedprox"):
        problems.append(
            f"privacy.dp={p.dp} needs federation.strategy=fedavg or fedprox: FedAvgM/FedAdam keep server state "
            "computed from the un-noised mean, which later rounds would release without noise"
        )
    if p.dp in CENTRAL and p.secagg:
        problems.append(
            "privacy.secagg=true with central DP is not implemented: Flower's Message-API DP "
            "wrappers cannot wrap the legacy strategy SecAgg+ needs (use privacy.dp=local with SecAgg+)"
        )
    if p.secagg and cfg.federation.clients_per_round < 2:
        problems.append("privacy.secagg=true needs federation.clients_per_round >= 2")
    if p.secagg and cfg.federation.evaluate_clients:
        problems.append("privacy.secagg=true does not support federation.evaluate_clients (legacy workflow)")
    if p.dp != "none" and not (p.clipping_norm > 0 and p.noise_multiplier >= 0 and 0 < p.delta < 1):
        problems.append("privacy: clipping_norm must be > 0, noise_multiplier >= 0, 0 < delta < 1")
    if p.dp == "local" and not p.local_epsilon > 0:
        problems.append("privacy.local_epsilon must be > 0")
    return problems


class _PackedDp:
    """What both central-DP wrappers add to Flower's: the packed vector's validation first, an
    unweighted mean, release only on a full round, a log per round and the RDP accountant."""

    strategy: PackedStrategy
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def _setup(self, population: int, delta: float, noise: np.random.Generator) -> None:
        """`noise`: the run's secret generator of DP noise (never seeded from the public seed)."""
        self.rounds: dict[int, dict] = {}  # round (counting resumed ones) -> what was released and spent
        self.noise = noise
        self.rdp = None
        if self.noise_multiplier > 0:
            config = PrivacyConfig(
                target_delta=delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
            self.rdp = RdpAccountant(config)

    def replay_releases(self, history: Sequence[dict]) -> None:
        """A resumed run's accountant: every release recorded before the resume already spent privacy."""
        for record in history:
            if self.rdp is not None and record.get("privacy", {}).get("released"):
                self._account()

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's Gaussian noise (the same std), drawn from the run's secret generator instead of
        numpy's global one, so that a resumed run continues the same noise stream."""
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noised = {}
        for key, array in aggregated_arrays.items():
            values = array.numpy()
            noised[key] = Array(values + self.noise.normal(0, std, values.shape).astype(values.dtype))
        return ArrayRecord(noised)

    def _account(self) -> None:
        self.rdp.compose(
            GaussianPrivacyEvent(
                noise_multiplier=self.noise_multiplier,
                sample_size=self.num_sampled_clients,
                population_size=self.rdp.config.population_size,
            )
        )

    def _clip(self, reply: Message) -> None:
        """Server-side variant: clip the reply's update in place (client-side: nothing to do)."""

    def start(self, grid, *args, **kwargs):
        return super().start(self.strategy.metered(grid), *args, **kwargs)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        inner = self.strategy
        norms, over = [], 0
        for reply in replies:
            if reply.has_error() or inner.train_reply_problem(reply):
                continue  # the packed strategy rejects it below, with its reason
            values = reply.content[inner.arrayrecord_key]["values"].numpy()
            norms.append(float(np.linalg.norm(values.astype(np.float64) - inner.global_values)))
            if norms[-1] > self.clipping_norm * (1 + 1e-5):
                over += 1
                self._clip(reply)  # only then: Flower's clip divides by the norm, which may be 0
            reply.content[METRICS_KEY][inner.weighted_by_key] = 1  # unweighted mean (see module doc)
        key = server_round + inner.round_offset
        arrays, metrics = inner.aggregate_train(server_round, replies)
        accepted = inner.accepted[key]
        record = {"update_norms": norms, "clipping_norm": self.clipping_norm, "over_norm": over}
        reason = None
        if arrays is None:
            reason = "no aggregate"
        elif accepted != self.num_sampled_clients:
            reason = f"{accepted} valid replies of {self.num_sampled_clients} sampled"
        elif over and isinstance(self, DifferentialPrivacyClientSideFixedClipping):
            reason = f"{over} client updates exceed clipping_norm (not clipped by the client)"
        if reason:
            self.rounds[key] = {**record, "released": False, "reason": reason}
            return None, None
        arrays = self._add_noise_to_aggregated_arrays(arrays)
        record.update(
            released=True,
            noise_std=compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients),
        )
        if self.rdp is not None:
            self._account()
            spent = self.rdp.get_privacy_spent()
            record.update(epsilon=spent.epsilon, delta=spent.delta, releases=spent.num_releases)
        self.rounds[key] = record
        return arrays, metrics


class ServerSideDp(_PackedDp, DifferentialPrivacyServerSideFixedClipping):
    """Central DP, the server clips each update (it sees them unclipped)."""

    def _clip(self, reply: Message) -> None:
        inner = self.strategy
        record = reply.content[inner.arrayrecord_key]
        vectors = [record["values"].numpy()]
        compute_clip_model_update(vectors, [inner.global_values], self.clipping_norm)
        record["values"] = Array(vectors[0].astype(np.float32))


class ClientSideDp(_PackedDp, DifferentialPrivacyClientSideFixedClipping):
    """Central DP, each client clips its own update (`fixedclipping_mod`); the server verifies."""


def wrap(
    strategy: PackedStrategy,
    cfg: DictConfig,
    noise: np.random.Generator,
    secagg_max_weight: float | None = None,
):
    """What runs the rounds: the packed strategy, a DP wrapper around it, or the SecAgg+ runner.
    All have `start(grid, initial_arrays, num_rounds, train_config, evaluate_fn)`. `noise`: the
    run's secret generator of central DP noise (`fedsparse.run`); `secagg_max_weight`: SecAgg+'s
    bound on a client's num-examples (`privacy.secagg_max_weight`, else the largest shard)."""
    p = cfg.get("privacy")
    if p is None:
        return strategy
    if p.secagg:
        if secagg_max_weight is None:
            raise ValueError(
                "SecAgg+ needs secagg_max_weight: privacy.secagg_max_weight or the largest shard"
            )
        return SecAggRunner(strategy, cfg, secagg_max_weight)
    if p.dp not in CENTRAL:
        return strategy
    cls = ServerSideDp if p.dp == "server" else ClientSideDp
    wrapped = cls(
        strategy, float(p.noise_multiplier), float(p.clipping_norm), cfg.federation.clients_per_round
    )
    wrapped._setup(cfg.federation.num_clients, float(p.delta), noise)
    return wrapped


def local_noise_std(cfg: DictConfig) -> float:
    """LocalDpMod's Gaussian std: sensitivity * sqrt(2 ln(1.25/delta)) / epsilon, with sensitivity
    2 * clipping_norm (two clipped updates differ by at most twice the norm)."""
    p = cfg.privacy
    return 2 * p.clipping_norm * math.sqrt(2 * math.log(1.25 / p.delta)) / p.local_epsilon


def round_record(cfg: DictConfig, runner, server_round: int) -> dict:
    """The `privacy` entry of a rounds.jsonl line ({} when privacy is off); rounds count resumed ones."""
    p = cfg.get("privacy")
    if p is None or (p.dp == "none" and not p.secagg) or server_round == 0:
        return {}
    out: dict = {"dp": p.dp, "secagg": bool(p.secagg)}
    if p.dp in CENTRAL:
        out.update(runner.rounds.get(server_round, {"released": False, "reason": "no reply"}))
    elif p.dp == "local":
        # (epsilon, delta) per round for each client; over r rounds basic composition gives r times
        out.update(local_epsilon=p.local_epsilon, delta=p.delta, noise_std=local_noise_std(cfg))
        out.update(epsilon_composed=p.local_epsilon * server_round, delta_composed=p.delta * server_round)
    if p.secagg:
        out.update(runner.round_record(server_round))
    return {"privacy": out}


def client_mod(resolve: Callable[[Context], DictConfig]) -> Mod:
    """The train handler's mod: SecAgg+ (outermost, when the server runs it) and the configured
    client-side DP mod. The config is resolved per message (deployment reads the run config)."""

    def mod(msg: Message, ctxt: Context, call_next: Callable) -> Message:
        cfg = resolve(ctxt)
        p = cfg.get("privacy")
        mods: list[Mod] = []
        if p is not None and p.dp == "client":
            mods.append(fixedclipping_mod)
        elif p is not None and p.dp == "local":
            c = float(p.clipping_norm)
            mods.append(LocalDpMod(c, 2 * c, float(p.local_epsilon), float(p.delta)))
        # outermost; passes through unless the message is a SecAgg+ one
        mods.insert(0, functools.partial(secagg_mod, seed=int(cfg.seed)))
        for outer in reversed(mods):
            call_next = _bind(outer, call_next)
        return call_next(msg, ctxt)

    return mod


def _bind(mod: Mod, call_next: Callable) -> Callable[[Message, Context], Message]:
    return lambda msg, ctxt: mod(msg, ctxt, call_next)
