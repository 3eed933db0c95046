"""Compressed downlink (docs/methods.md, Compression): the server's global is exactly what every
client rebuilds from the digest of the global it holds plus the quantised change."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from harness.federation import PARTIAL_PARTICIPATION, TRAIN_CONFIG_VALUES
from harness.fixtures import forget_client_memory

from fedsparse.apps import client_state, client_train
from fedsparse.apps.inprocess import InProcessGrid
from fedsparse.apps.server_app import make_strategy
from fedsparse.config import compose, compression_tags, run_key
from fedsparse.federation import compression
from fedsparse.federation.accounting import CommLedger
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model
from fedsparse.run import compose_config, problems

TRAIN_CONFIG = ConfigRecord(TRAIN_CONFIG_VALUES)
OVERRIDES = [*PARTIAL_PARTICIPATION, "compression=both", "run_name=downlink"]


def _kind(arrays) -> str:
    if compression.KEY in arrays:
        return "delta"
    return "base" if compression.BASE_KEY in arrays else "full"


class Recorder:
    """What the server sent to whom (per round) and the global each client rebuilt."""

    def __init__(self, monkeypatch):
        self.sent: list[tuple[int, int, str, np.ndarray]] = []  # round, node, kind, server global
        self.rebuilt: list[np.ndarray] = []  # each client's received global, in message order
        real = client_state.downlink

        def downlink(cfg, method, arrays, config, partition):
            received = real(cfg, method, arrays, config, partition)
            self.rebuilt.append(received.copy())
            return received

        monkeypatch.setattr(client_train, "downlink", downlink)

    def watch(self, strategy):
        send = strategy._send

        def _send(messages, arrays):
            out = send(messages, arrays)
            for m in out:
                kind = _kind(m.content["arrays"])
                self.sent.append(
                    (strategy.current_round, m.metadata.dst_node_id, kind, strategy.global_values)
                )
            return out

        strategy._send = _send


def _federate(cfg, rec, rounds: int, offset: int, start: np.ndarray, state: dict | None = None):
    method = client_train.client_method(cfg)
    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    strategy.round_offset = offset
    if state is not None:
        strategy.load_state_arrays(state)
    rec.watch(strategy)
    config = ConfigRecord(dict(TRAIN_CONFIG) | {client_state.RUN_KEY: run_key(cfg)})
    result = strategy.start(
        grid=InProcessGrid(cfg),
        initial_arrays=ArrayRecord({"values": Array(start)}),
        num_rounds=rounds,
        train_config=config,
    )
    return result.arrays["values"].numpy(), strategy


def _start(cfg) -> np.ndarray:
    return build_method(load_model("tiny-bert", 2, cfg.seed), cfg.method).initial_state()


SCALED_SIGN = ["compression.downlink_bits=1", "compression.rounding=sign"]


@pytest.mark.parametrize(
    "feedback, extra", [(False, []), (True, []), (True, SCALED_SIGN)], ids=["plain", "error-feedback", "sign"]
)
def test_server_and_clients_hold_the_bit_identical_global_every_round(
    app_identity, store_dir, monkeypatch, feedback, extra
):
    """Four rounds, 2 of 3 clients each: every client rebuilds exactly the server's global; round 1
    sends no vector (only its digest); a client that trained in the round before gets the delta, one
    that skipped it the full vector; the server's global is the quantised one it broadcast (also
    when the server carries its rounding error into the next round's change, and when it sends
    the change as its scaled sign at 1 bit)."""
    cfg = compose_config(OVERRIDES + [f"compression.downlink_error_feedback={feedback}", *extra])
    forget_client_memory()
    rec = Recorder(monkeypatch)
    final, strategy = _federate(cfg, rec, 4, 0, _start(cfg))
    assert len(rec.sent) == len(rec.rebuilt) == 8
    assert (strategy.downlink_residual is not None) == feedback
    trained: dict[int, set[int]] = {}
    for (rnd, node, kind, server), client in zip(rec.sent, rec.rebuilt, strict=True):
        np.testing.assert_array_equal(client, server)  # bit for bit
        trained.setdefault(rnd, set()).add(node)
        if rnd == 1:
            assert kind == "base"  # round 1: the digest of the initial global only
        elif node in trained[rnd - 1] or rnd == 2:
            assert kind == "delta"  # holds the previous global (or, before round 2, the initial one)
        else:
            assert kind == "full", (rnd, node)
    kinds = {k for _, _, k, _ in rec.sent}
    assert {"base", "delta"} <= kinds
    base, wire, result = strategy.pending
    assert compression.global_digest(final) == result
    np.testing.assert_array_equal(final, compression.apply_delta(rec.sent[-1][3], wire))
    if extra:  # the scaled sign of what the server rounded (the sent change plus what it kept back)
        sent = compression.decode(wire, final.size).astype(np.float64)
        rounded = strategy.downlink_residual + sent
        block = cfg.compression.block
        means = [np.abs(rounded[i : i + block]).mean() for i in range(0, rounded.size, block)]
        means = np.repeat(means, block)[: rounded.size]
        np.testing.assert_allclose(np.abs(sent), means, rtol=1e-3)
        clear = np.abs(rounded) > 1e-3 * means  # signs of values that float rounding cannot flip
        np.testing.assert_array_equal(np.sign(sent)[clear], np.sign(rounded)[clear])
    for rnd in range(1, 5):
        down = [e for e in strategy.ledger.rounds[rnd] if e["direction"] == "down" and e["kind"] == "train"]
        assert len(down) == 2
        if rnd == 1:
            assert all(e["values"] == 0 and e["bytes"] < 1000 for e in down)


def test_a_client_without_the_base_refuses_and_then_gets_the_full_vector(store_dir, app_identity):
    """A corrupted or missing stored global is never trained on: the client refuses with the reason;
    its error reply makes the server send it the full vector; a digest it reports is used again."""
    cfg = compose_config(OVERRIDES)
    forget_client_memory()
    method = client_train.client_method(cfg)
    g0 = method.initial_state()
    g1 = g0 + np.float32(1e-3)
    store = client_state.GlobalStore("k", 0)
    store.save(g1, keep=set())
    config = {client_state.RUN_KEY: "k"}
    d1 = compression.global_digest(g1)
    delta = compression.encode(np.full(g0.size, 1e-3, np.float32), 4, 128, np.random.default_rng(0))
    arrays = {compression.BASE_KEY: np.frombuffer(d1, np.uint8), compression.KEY: delta}
    np.testing.assert_array_equal(
        client_state.downlink(cfg, method, arrays, config, 0), compression.apply_delta(g1, delta)
    )
    path = store.dir / f"{d1.hex()}.npy"
    assert path.exists()  # kept as the base of the new global
    np.save(path, g1 + 1)  # corrupted
    with pytest.raises(RuntimeError, match=f"holds no global with digest {d1.hex()}"):
        client_state.downlink(cfg, method, arrays, config, 0)
    path.unlink()  # missing
    with pytest.raises(RuntimeError, match="missing or corrupted"):
        client_state.downlink(cfg, method, arrays, config, 0)
    # a full vector keeps the globals the node held before (the server may still send a delta)
    before = store.newest(1)  # the global rebuilt above
    assert len(before) == 1
    g2 = client_state.downlink(cfg, method, {"values": g1 + 2}, config, 0)
    assert before | {compression.global_digest(g2)} == store.newest(3)
    # the initial global needs no store: the client computes it
    arrays = {compression.BASE_KEY: np.frombuffer(compression.global_digest(g0), np.uint8)}
    np.testing.assert_array_equal(client_state.downlink(cfg, method, arrays, config, 1), g0)

    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    strategy.global_values = g0
    assert _kind(strategy._downlink(7)) == "base"  # an unknown node holds the initial global
    error = Message(Error(code=0, reason="no global"), reply_to=_train_msg())
    error.metadata.__dict__["_src_node_id"] = 7
    strategy.record_held(error)
    assert strategy.held[7] == b"" and strategy._downlink(7) is None  # None: the full vector


def _train_msg() -> Message:
    return Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("feedback", [False, True], ids=["plain", "error-feedback"])
def test_resume_rebuilds_the_same_globals_after_a_kill(app_identity, store_dir, monkeypatch, feedback):
    """Rounds 1-4 uninterrupted against: rounds 1-2, a checkpoint of the server's state, round 3
    (the clients store its global), a kill before round 3's checkpoint, and rounds 3-4 again from
    the round-2 checkpoint. Same globals on both, bit for bit, and the clients rebuild them; the
    server's error-feedback residual is part of the checkpoint."""
    cfg = compose_config(OVERRIDES + [f"compression.downlink_error_feedback={feedback}"])
    start = _start(cfg)
    monkeypatch.setenv("FEDSPARSE_CACHE_DIR", str(store_dir / "a"))
    forget_client_memory()
    rec = Recorder(monkeypatch)
    uninterrupted, _ = _federate(cfg, rec, 4, 0, start)
    reference = [s[3] for s in rec.sent]

    monkeypatch.setenv("FEDSPARSE_CACHE_DIR", str(store_dir / "b"))
    forget_client_memory()
    rec = Recorder(monkeypatch)
    after_two, strategy = _federate(cfg, rec, 2, 0, start)
    state = {k: v.copy() for k, v in strategy.state_arrays().items()}
    assert {"downlink-pending", "downlink-delta", "downlink-nodes", "downlink-held"} <= set(state)
    assert ("downlink-residual" in state) == feedback
    _federate(cfg, rec, 1, 2, after_two, state)  # round 3; the server dies before its checkpoint
    forget_client_memory()
    resumed, _ = _federate(cfg, rec, 2, 2, after_two, state)
    np.testing.assert_array_equal(resumed, uninterrupted)
    for (_, _, _, server), client in zip(rec.sent, rec.rebuilt, strict=True):
        np.testing.assert_array_equal(client, server)
    for ref, got in zip(reference, rec.sent[:4] + rec.sent[6:], strict=True):
        np.testing.assert_array_equal(ref, got[3])
    assert any(k == "delta" for r, _, k, _ in rec.sent[6:] if r == 3)  # the rerun uses the kept base


def test_downlink_error_feedback_keeps_the_broadcast_on_the_aggregates_path():
    """Fifty rounds of a server whose aggregate moves every value by the same small change d: without
    error feedback the broadcast globals drift from the sum of the aggregates' changes like a random
    walk of 2-bit roundings; with it, the drift is minus the residual, and the residual stays below
    one step of each round's grid (2 s / 3, s = max |d + residual| over the block)."""
    method = build_method(load_model("tiny-bert", 2, 0), compose(OVERRIDES).method)
    g0 = method.initial_state()
    d = np.random.default_rng(1).normal(0, 1e-3, g0.size).astype(np.float32)
    drift = {}
    for feedback in (False, True):
        overrides = ["compression.downlink_bits=2", f"compression.downlink_error_feedback={feedback}"]
        strategy = make_strategy(compose(OVERRIDES + overrides), method, CommLedger(method.head_size))
        strategy.global_values = g0
        for rnd in range(1, 51):
            carried = d if strategy.downlink_residual is None else d + strategy.downlink_residual
            aggregate = ArrayRecord({"values": Array(strategy.global_values + d)})
            strategy.global_values = strategy.quantise_global(rnd, aggregate)["values"].numpy()
            if feedback:
                step = np.repeat(2 * compression.block_scales(carried, 128) / 3, 128)[: g0.size]
                assert (np.abs(strategy.downlink_residual) <= step + 1e-6).all(), rnd
        drift[feedback] = strategy.global_values.astype(np.float64) - g0 - 50 * d.astype(np.float64)
    np.testing.assert_allclose(drift[True], -strategy.downlink_residual, atol=1e-5)  # + float32 sums
    rms = {k: float(np.sqrt(np.mean(v**2))) for k, v in drift.items()}
    assert rms[False] > 3 * rms[True], rms  # a random walk of 50 roundings against one


def test_downlink_bytes_follow_the_formula(app_identity, store_dir, monkeypatch):
    """A delta downlink costs a digest-only downlink plus the quantised array's payload bytes plus
    that array's own framing (its .npy header and protobuf fields, under 256 bytes), and the ledger
    counts exactly the payload as values."""
    cfg = compose_config(OVERRIDES + ["federation.clients_per_round=3"])
    forget_client_memory()
    rec = Recorder(monkeypatch)
    _, strategy = _federate(cfg, rec, 2, 0, _start(cfg))
    n, bits, block = strategy.method.num_values(), cfg.compression.downlink_bits, cfg.compression.block
    train = {r: [e for e in strategy.ledger.rounds[r] if e["kind"] == "train"] for r in (1, 2)}
    base_only = [e["bytes"] for e in train[1] if e["direction"] == "down"]
    delta = [e for e in train[2] if e["direction"] == "down"]
    assert [k for r, _, k, _ in rec.sent if r == 2] == ["delta"] * 3
    payload = compression.payload_bytes(n, bits, block)
    for entry in delta:
        assert entry["values"] + entry["head"] == payload
        assert 0 <= entry["bytes"] - (base_only[0] + payload) < 256, (entry["bytes"], base_only, payload)
    up = [e["bytes"] for e in train[2] if e["direction"] == "up"]
    print(f"{n:,} values: round-1 down {base_only}, round-2 down {[e['bytes'] for e in delta]}, up {up}")


def test_the_run_key_survives_a_resume_with_more_rounds():
    """A resumed run may change its rounds (run.RESUMABLE): its clients must find their residuals
    and globals under the same key."""
    a = compose_config(OVERRIDES + ["federation.rounds=2"])
    b = compose_config(OVERRIDES + ["federation.rounds=5", "federation.wait_timeout=60"])
    assert run_key(a) == run_key(b)
    assert run_key(a) != run_key(compose_config(OVERRIDES + ["compression.downlink_bits=2"]))


def test_config_names_the_downlink_and_refuses_central_dp_and_secagg():
    base = ["model=tiny", "compression=both", "run_name=auto"]
    cfg = compose_config(base)
    assert problems(cfg) == [] and "-q4ef-d4-" in cfg.run_name
    fed_back = compose_config(
        [*base, "compression.downlink_bits=2", "compression.downlink_error_feedback=true"]
    )
    assert problems(fed_back) == [] and "-q4ef-d2ef-" in fed_back.run_name
    assert compression_tags(fed_back.compression) == ["q4ef", "d2ef"]  # the report's labels too
    alone = compose_config(["model=tiny", "compression=none", "compression.downlink_bits=2", "run_name=auto"])
    assert problems(alone) == [] and "-d0.005-d2-sst2-" in alone.run_name
    assert "-q4ef-sst2-" in compose_config(["model=tiny", "compression=uplink", "run_name=auto"]).run_name
    down = ["model=tiny", "compression=none", "compression.downlink_bits=4"]
    for extra, why in [
        (
            ["privacy.secagg=true", "federation.clients_per_round=2"],
            "downlink_bits cannot be used with privacy.secagg",
        ),
        (["privacy.dp=server"], "downlink_bits cannot be used with privacy.dp=server"),
        (["privacy.dp=client"], "downlink_bits cannot be used with privacy.dp=client"),
        (["compression.downlink_bits=3"], "compression.downlink_bits=3"),
        (
            ["compression.downlink_bits=0", "compression.downlink_error_feedback=true"],
            "downlink_error_feedback=true needs a compressed downlink",
        ),
    ]:
        found = problems(compose(down + extra))
        assert any(why in p for p in found), found
    assert not [p for p in problems(compose(down + ["privacy.dp=local"])) if "compression" in p]


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_server_optimisers_broadcast_exactly_their_global(app_identity, store_dir, monkeypatch, strategy):
    """FedAvgM's and FedAdam's steps are quantised like FedAvg's mean: the clients rebuild the
    server's global bit for bit, and the final global is the last broadcast delta applied."""
    cfg = compose_config(OVERRIDES + [f"federation.strategy={strategy}"])
    forget_client_memory()
    rec = Recorder(monkeypatch)
    final, s = _federate(cfg, rec, 3, 0, _start(cfg))
    for (_, _, _, server), client in zip(rec.sent, rec.rebuilt, strict=True):
        np.testing.assert_array_equal(client, server)
    assert "delta" in {k for _, _, k, _ in rec.sent}
    assert compression.global_digest(final) == s.pending[2]
