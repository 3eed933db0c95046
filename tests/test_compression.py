"""Compressed uplink: the quantiser is unbiased and within its error bound, a message's bytes follow
the formula, the server drops malformed arrays with a reason and aggregates the dequantised
updates, and the error-feedback residual carries over skipped rounds and resumes bit-identically."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from harness.federation import PARTIAL_PARTICIPATION, TRAIN_CONFIG_VALUES
from harness.fixtures import forget_client_memory
from harness.models import REPO, method_cfg, packed_strategy, tiny_model
from omegaconf import OmegaConf

from fedsparse.apps import client_state, client_train
from fedsparse.apps.inprocess import InProcessGrid
from fedsparse.apps.server_app import make_strategy
from fedsparse.config import compose, run_key
from fedsparse.federation import compression
from fedsparse.federation.accounting import CommLedger, wire_bytes
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model
from fedsparse.run import compose_config, problems

BITS = (1, 2, 4, 8)


def _levels_step(scales: np.ndarray, bits: int, block: int, n: int) -> np.ndarray:
    return np.repeat(2.0 * scales.astype(np.float64) / (2**bits - 1), block)[:n]


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
    """The mean of N seeded draws is within 4 standard errors of x, entry by entry, where the
    standard error comes from the quantiser's variance bound step^2/4 (step = 2s/(L-1)); the
    mean error over all entries is within 4 standard errors of the exact variance p(1-p) step^2."""
    block, n, draws = 16, 64, 4000
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    decoded = np.stack(
        [
            compression.decode(compression.encode(x, bits, block, compression.rounding_rng(7, r, 3)), n)
            for r in range(draws)
        ]
    ).astype(np.float64)
    step = _levels_step(compression.block_scales(x, block), bits, block, n)
    error = decoded.mean(axis=0) - x
    se_bound = step / 2 / np.sqrt(draws)
    assert np.all(np.abs(error) <= 4 * se_bound + 1e-6), np.max(np.abs(error) / se_bound)
    u = (x + np.repeat(compression.block_scales(x, block), block)[:n]) / step
    p = u - np.floor(u)
    se_total = np.sqrt((p * (1 - p) * step**2).sum() / draws)  # of the sum of the entries' means
    assert abs(error.sum()) <= 4 * se_total + 1e-5
    print(f"{bits} bits: max |mean error| / SE(bound) = {np.max(np.abs(error) / se_bound):.2f}")


@pytest.mark.parametrize("bits", BITS)
def test_each_value_is_within_one_step_of_its_block_scale(bits):
    block = 32
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32) * np.repeat(
        np.logspace(-3, 1, 32), 32
    )[:1000].astype(np.float32)
    x[64:96] = 0.0  # an all-zero block decodes to zeros
    wire = compression.encode(x, bits, block, compression.rounding_rng(0, 1, 0))
    y = compression.decode(wire, x.size, bits, block)
    scales = compression.block_scales(x, block)
    np.testing.assert_array_equal(scales, np.abs(np.pad(x, (0, 24))).reshape(-1, block).max(axis=1))
    step = _levels_step(scales, bits, block, x.size)
    assert np.all(np.abs(y.astype(np.float64) - x) <= step * (1 + 1e-6))
    assert np.all(np.abs(y) <= np.repeat(scales, block)[: x.size] * (1 + 1e-6))  # never beyond [-s, s]
    assert not y[64:96].any()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_the_array_has_exactly_the_formula_bytes(bits, n):
    wire = compression.encode(np.ones(n, np.float32), bits, 256, compression.rounding_rng(0, 1, 0))
    assert wire.dtype == np.uint8
    assert wire.size == compression.HEADER + 4 * -(-n // 256) + -(-n * bits // 8)


def _means_by_hand(x: np.ndarray, block: int) -> np.ndarray:
    """Each value's block mean |x|, block by block (the short last block over its own values)."""
    return np.concatenate(
        [np.full(x[i : i + block].size, np.abs(x[i : i + block]).mean()) for i in range(0, x.size, block)]
    )


def test_the_scaled_sign_sends_each_sign_at_its_block_mean():
    """rounding="sign": every value decodes to +-mean|x| of its block (the short last block's mean
    over its own values), by its sign and without draws, and its error per block,
    ||x||^2 - ||x||_1^2 / len, is below the block's energy. Only at 1 bit."""
    block = 32
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    x[64:96], x[5] = 0.0, 0.0  # an all-zero block decodes to zeros; an exact 0 elsewhere to +s
    wires = [compression.encode(x, 1, block, compression.rounding_rng(0, r, 0), "sign") for r in (1, 2)]
    np.testing.assert_array_equal(wires[0], wires[1])
    assert wires[0].size == compression.payload_bytes(x.size, 1, block)
    y = compression.decode(wires[0], x.size, 1, block).astype(np.float64)
    means = _means_by_hand(x.astype(np.float64), block)
    np.testing.assert_allclose(y, np.where(x >= 0, means, -means), rtol=1e-6)
    for i in range(0, x.size, block):
        xb, err = x[i : i + block].astype(np.float64), ((y - x)[i : i + block] ** 2).sum()
        energy = (xb**2).sum()
        assert err == pytest.approx(energy - np.abs(xb).sum() ** 2 / xb.size, rel=1e-4) and (
            err < energy or energy == 0
        )
    assert not y[64:96].any() and y[5] > 0
    empty = compression.encode(np.zeros(0, np.float32), 1, block, compression.rounding_rng(0, 1, 0), "sign")
    assert compression.decode(empty, 0).size == 0
    with pytest.raises(ValueError, match="sign at 1 bit"):
        compression.encode(x, 2, block, compression.rounding_rng(0, 1, 0), "sign")


def _server(compressed: bool = True, bits: int = 4, block: int = 64, method: str = "pafi"):
    m = build_method(tiny_model(), method_cfg(method, density=0.05))
    strategy = packed_strategy(m)
    strategy.compression = (bits, block) if compressed else None
    return strategy


def _compressed_reply(strategy, wire: np.ndarray, weight: int = 10, extra: dict | None = None) -> Message:
    arrays = {compression.KEY: wire} | (extra or {})
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord(
                {"num-examples": weight, "train-loss": 0.5, "train-seconds": 1.0, "setup-seconds": 0.5}
            ),
            "info": ConfigRecord({"fingerprint": strategy.fingerprint}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_malformed_compressed_replies_are_dropped_with_a_reason(app_identity):
    strategy = _server()
    g, n = strategy.global_values, strategy.global_values.size
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(n).astype(np.float32) * 1e-2 for _ in range(2)]
    wires = [compression.encode(u, 4, 64, compression.rounding_rng(0, 1, i)) for i, u in enumerate(updates)]
    nblocks = -(-n // 64)

    def corrupt(offset: int, data: bytes) -> np.ndarray:
        w = wires[0].copy()
        w[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
        return w

    bad = {
        "magic": corrupt(0, b"XX"),
        "bits=3": corrupt(3, bytes([3])),
        "this run uses bits=4": compression.encode(updates[0], 8, 64, compression.rounding_rng(0, 1, 0)),
        "this run uses bits=4, block=64": compression.encode(
            updates[0], 4, 32, compression.rounding_rng(0, 1, 0)
        ),
        f"expected {n}": compression.encode(updates[0][:-1], 4, 64, compression.rounding_rng(0, 1, 0)),
        "header implies": wires[0][:-1],
        "less than its 12-byte header": wires[0][:5],
        "NaN, infinite or negative scale": corrupt(12, np.float32([np.nan]).tobytes()),
        "negative scale": corrupt(12 + 4 * (nblocks - 1), np.float32([-1.0]).tobytes()),
        "1-D uint8": wires[0].astype(np.int16),
    }
    replies = [_compressed_reply(strategy, w) for w in wires]
    replies += [_compressed_reply(strategy, w, 5) for w in bad.values()]
    plain = Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord({"values": Array(g + 1)}),
                "metrics": replies[0].content["metrics"],
                "info": replies[0].content["info"],
            }
        ),
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )
    bad["compressed reply has arrays ['values']"] = plain
    replies.append(plain)
    arrays, _ = strategy.aggregate_train(1, replies)
    reasons = strategy.rejected[1]
    assert len(reasons) == len(bad)
    for why, reason in zip(bad, reasons, strict=True):
        assert why in reason, (why, reason)
    # FedAvg saw the dequantised values: the weighted mean of global + dequantised update
    dequantised = [g + compression.decode(w, n) for w in wires]
    np.testing.assert_allclose(arrays["values"].numpy(), (dequantised[0] + dequantised[1]) / 2, atol=1e-7)


@pytest.mark.parametrize("bits, rounding", [(4, "stochastic"), (1, "sign")])
def test_topk_values_are_quantised_and_its_indices_kept(app_identity, bits, rounding):
    strategy = _server(method="topk", bits=bits)
    m, g = strategy.method, strategy.global_values
    local = g + np.random.default_rng(3).standard_normal(g.size).astype(np.float32) * 1e-2
    wire = m.encode(local, reference=g)
    reference = m.wire_reference(wire, g)
    update = wire.pop("values") - reference
    codes = compression.encode(update, bits, 64, compression.rounding_rng(0, 1, 0), rounding)
    reply = _compressed_reply(strategy, codes, extra={"indices": wire["indices"]})
    arrays, _ = strategy.aggregate_train(1, [reply])
    expected = m.decode({**wire, "values": reference + compression.decode(codes, update.size)}, g)
    np.testing.assert_array_equal(arrays["values"].numpy(), expected)
    assert not strategy.rejected


def test_config_refuses_secagg_and_client_dp_and_names_the_run():
    base = ["model=tiny", "compression=uplink"]
    cfg = compose_config(base + ["run_name=auto"])
    assert problems(cfg) == [] and "-q4ef-" in cfg.run_name
    assert (
        "-q8-"
        in compose_config(
            base + ["run_name=auto", "compression.error_feedback=false", "compression.bits=8"]
        ).run_name
    )
    assert "q4" not in compose_config(["model=tiny", "run_name=auto"]).run_name
    for extra, why in [
        (["privacy.secagg=true", "federation.clients_per_round=2"], "cannot be summed under masks"),
        (["privacy.dp=local"], "privacy.dp=local"),
        (["privacy.dp=client"], "privacy.dp=client"),
        (["compression.bits=3"], "compression.bits=3"),
    ]:
        found = problems(compose(base + extra))
        assert any(why in p for p in found), found
    assert not [p for p in problems(compose(base + ["privacy.dp=server"])) if "compression" in p]
    # the uplink's settings without compression=uplink would be ignored: refused, naming the fix
    found = problems(compose(["model=tiny", "compression.bits=4", "compression.error_feedback=true"]))
    assert found == [
        "compression.bits=4, compression.error_feedback=true would do nothing: the uplink is not "
        "compressed (compression=none); add compression=uplink (or compression=both for the downlink too)"
    ]
    assert problems(compose(["model=tiny", "compression.downlink_bits=4"])) == []


def test_error_feedback_settles_at_two_bits_diverges_at_one_and_is_refused_there():
    """Error feedback needs a rounding error smaller than the update (a contraction). Feeding one
    Gaussian update back ten times: at 2 bits the residual settles near the update's size; at 1 bit
    (error E|q(x)-x|^2 = s^2 - x^2 per value, about 9x the update's energy) it grows every round.
    So the config refuses unbiased 1 bit with error feedback, up and down. The scaled sign's
    residual grows only slowly (about as the square root of the rounds: 2.5x the update after 10),
    so what the server received over the ten rounds is within a quarter of ten updates, as at 2
    bits; the config accepts it."""
    x = np.random.default_rng(0).normal(size=20_000).astype(np.float32)
    growth = {}
    for bits, rounding in ((1, "stochastic"), (2, "stochastic"), (1, "sign")):
        residual = np.zeros_like(x)
        for rnd in range(10):
            carried = x + residual
            wire = compression.encode(carried, bits, 256, np.random.default_rng(rnd), rounding)
            residual = carried - compression.decode(wire, x.size)
        growth[bits, rounding] = float(np.linalg.norm(residual) / np.linalg.norm(x))
    assert growth[2, "stochastic"] < 2 and growth[1, "stochastic"] > 100, growth
    assert growth[1, "sign"] / 10 < 0.3, growth  # the ten rounds' sum is off by its last residual
    sign = ["model=tiny", "compression=uplink", "compression.bits=1", "compression.rounding=sign"]
    assert problems(compose(sign)) == [] and "-q1sef-" in compose_config([*sign, "run_name=auto"]).run_name
    down = ["model=tiny", "compression=both", "compression.bits=2", "compression.downlink_bits=1"]
    down += ["compression.downlink_error_feedback=true", "compression.rounding=sign"]
    assert (
        problems(compose(down)) == [] and "-q2ef-d1sef-" in compose_config([*down, "run_name=auto"]).run_name
    )
    # compression=sign is the frontier's committed q1sef,d2ef runs, by name
    frontier = ["+experiment=frontier", "method=pafi", "train.lr=2e-2", "seed=0"]
    assert compose_config([*frontier, "compression=sign"]).run_name == (
        "pafi-smallest-d0.005-q1sef-d2ef-sst2-a1-lr0.02-s0-4c2728"
    )
    assert (
        REPO / "experiments/results/frontier/pafi-smallest-d0.005-q1sef-d2ef-sst2-a1-lr0.02-s0-4c2728"
    ).is_dir()
    for extra, why in [
        (["compression=uplink", "compression.rounding=sign"], "a direction sent at 1 bit"),
        (["compression.rounding=sign"], "a direction sent at 1 bit"),
        (["compression=uplink", "compression.rounding=nearest"], "compression.rounding=nearest"),
        ([*sign[1:], "compression.error_feedback=false"], "sign with error_feedback=false"),
        ([*down[1:], "compression.downlink_error_feedback=false"], "sign with downlink_error_feedback=false"),
    ]:
        found = problems(compose(["model=tiny", *extra]))
        assert any(why in p for p in found), found
    for extra in (
        ["compression=uplink", "compression.bits=1"],
        ["compression=both", "compression.downlink_bits=1", "compression.downlink_error_feedback=true"],
    ):
        assert any("error feedback diverges at 1 bit" in p for p in problems(compose(["model=tiny", *extra])))
    assert (
        problems(
            compose(
                ["model=tiny", "compression=uplink", "compression.bits=1", "compression.error_feedback=false"]
            )
        )
        == []
    )


# --- error feedback: the client's residual -------------------------------------------------------


@pytest.mark.parametrize("bits, rounding", [(2, "stochastic"), (1, "sign")])
def test_the_residual_carries_over_a_skipped_round(store_dir, bits, rounding):
    """A partition trained in rounds 1 and 3 (not 2): round 3 adds round 1's residual, and what the
    server reconstructs plus the last residual is exactly the sum of the true updates (with the
    scaled sign too, whose first update arrives as its signs at each block's mean |x|)."""
    compressed = {"enabled": True, "bits": bits, "block": 64, "error_feedback": True, "rounding": rounding}
    cfg = OmegaConf.create({"seed": 0, "compression": compressed})
    method = build_method(tiny_model(), method_cfg("pafi", density=0.05))
    g = method.initial_state().copy()
    rng = np.random.default_rng(4)
    sent_total, true_total = np.zeros(g.size), np.zeros(g.size)
    store = client_state.ResidualStore("k", 0)
    for server_round in (1, 3, 4):
        local = g + rng.standard_normal(g.size).astype(np.float32) * 1e-2
        method.unpack(local)
        config = {"server-round": server_round, client_state.RUN_KEY: "k"}
        before = store.load(server_round)
        wire = client_state.uplink(cfg, method, g, config, 0)
        sent = g + compression.decode(wire[compression.KEY], g.size)
        target = local if before is None else local + before
        if rounding == "sign" and before is None:
            means = _means_by_hand((target - g).astype(np.float64), 64)
            np.testing.assert_allclose(sent - g, np.where(target >= g, means, -means), rtol=1e-5)
        np.testing.assert_array_equal(store.load(server_round + 1), target - sent)  # what was lost
        sent_total += sent.astype(np.float64) - g
        true_total += local.astype(np.float64) - g
    assert sorted(p.name for p in store.dir.iterdir()) == ["r000003.npy", "r000004.npy"]
    np.testing.assert_allclose(sent_total + store.load(5), true_total, atol=1e-5)


def _federate(cfg, grid, rounds: int, offset: int, start: np.ndarray):
    """`rounds` rounds after round `offset` from global `start`, in process; the final global and
    each client reply the server received."""
    method = client_train.client_method(cfg)
    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    strategy.round_offset = offset
    config = ConfigRecord(dict(TRAIN_CONFIG_VALUES) | {client_state.RUN_KEY: run_key(cfg)})
    grid.received = []
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"values": Array(start)}),
        num_rounds=rounds,
        train_config=config,
    )
    return result.arrays["values"].numpy(), strategy


def _uplinks(grid) -> list[bytes]:
    """The compressed arrays of the last round's replies (the grid keeps each run's replies)."""
    arrays = [r.content.array_records.get("arrays", {}) for r in grid.received]
    return [a[compression.KEY].numpy().tobytes() for a in arrays if compression.KEY in a][-2:]


OVERRIDES = [*PARTIAL_PARTICIPATION, "compression=uplink", "run_name=ef-resume"]


def test_error_feedback_resumes_bit_identically_after_a_kill(app_identity, store_dir, monkeypatch):
    """Uninterrupted rounds 1-3 against: rounds 1-2, then round 3 (its residuals written), a kill
    before the server's round-3 checkpoint, and round 3 again from round 2's global state. The
    rerun reads the residuals of the rounds before 3, not the abandoned round 3's."""
    cfg = compose_config(OVERRIDES)
    start = build_method(load_model("tiny-bert", 2, cfg.seed), cfg.method).initial_state()
    monkeypatch.setenv("FEDSPARSE_CACHE_DIR", str(store_dir / "a"))
    forget_client_memory()
    grid = InProcessGrid(cfg)
    uninterrupted, strategy = _federate(cfg, grid, 3, 0, start)
    last_round = _uplinks(grid)
    assert sorted(strategy.accepted.values()) == [2, 2, 2]

    monkeypatch.setenv("FEDSPARSE_CACHE_DIR", str(store_dir / "b"))
    forget_client_memory()
    grid = InProcessGrid(cfg)
    after_two, _ = _federate(cfg, grid, 2, 0, start)
    abandoned, _ = _federate(
        cfg, grid, 1, 2, after_two
    )  # round 3 trains; the server dies before its checkpoint
    forget_client_memory()
    grid = InProcessGrid(cfg)  # fresh contexts: Flower's context.state is gone too
    resumed, _ = _federate(cfg, grid, 1, 2, after_two)
    rerun = _uplinks(grid)
    assert rerun == last_round
    np.testing.assert_array_equal(resumed, uninterrupted)
    np.testing.assert_array_equal(abandoned, uninterrupted)
    residuals = sorted(p.relative_to(store_dir / "b") for p in (store_dir / "b" / "residuals").rglob("*.npy"))
    assert residuals and all(p.parts[1] == run_key(cfg) for p in residuals)


@pytest.mark.parametrize("bits", [32, *BITS])
def test_reply_bytes_follow_the_formula(app_identity, store_dir, bits):
    """A real train reply's serialized size is the uncompressed reply's framing (its size minus its
    4-byte values) plus values x bits / 8 + 4 bytes per scale + the 12-byte header, within 1%; and
    the ledger counts exactly the array's bytes as payload."""
    overrides = ["model=tiny", "method=pafi", "method.density=0.2", "train.local_steps=1"]
    overrides += ["train.batch_size=8", "data.max_train_examples=100", "data.max_length=32"]
    if bits != 32:
        overrides += ["compression=uplink", f"compression.bits={bits}", "compression.error_feedback=false"]
    cfg = compose_config(overrides)
    forget_client_memory()
    method = client_train.client_method(cfg)
    g = method.initial_state()
    config = ConfigRecord(
        dict(TRAIN_CONFIG_VALUES)
        | {"fingerprint": method.fingerprint(), "server-round": 1, client_state.RUN_KEY: "x"}
    )
    content = RecordDict({"arrays": ArrayRecord({"values": Array(g)}), "config": config})
    msg = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    from flwr.app import Context

    context = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    reply = client_train.handle_train(msg, context, cfg)
    n = method.num_values()
    plain = RecordDict({**reply.content, "arrays": ArrayRecord({"values": Array(g)})})
    framing = wire_bytes(Message(content=plain, reply_to=msg)) - 4 * n
    measured = wire_bytes(reply)
    if bits == 32:
        assert measured == framing + 4 * n
    else:
        block = cfg.compression.block
        formula = framing + n * bits / 8 + 4 * -(-n // block) + compression.HEADER
        assert abs(measured - formula) <= 0.01 * formula, (measured, formula)
        ledger = CommLedger(method.head_size)
        ledger.add(1, "train", "up", 1, measured, reply.content)
        entry = ledger.rounds[1][0]
        assert entry["values"] + entry["head"] == compression.payload_bytes(n, bits, block)
    print(f"{bits:>2} bits: {n:,} values, reply {measured:,} bytes ({framing} of framing)")


def test_central_dp_clips_and_noises_the_decompressed_updates(app_identity):
    """privacy.dp=server: the norms are those of the dequantised updates, each clipped after
    decompression, and the unweighted mean of the clipped dequantised updates is released."""
    from fedsparse.privacy.dp import ServerSideDp

    strategy = _server(bits=8, block=64)
    g, n, clip = strategy.global_values, strategy.global_values.size, 0.5
    rng = np.random.default_rng(5)
    updates = [u / np.linalg.norm(u) * s * clip for u, s in zip(rng.standard_normal((3, n)), (0.5, 2, 5))]
    wires = [
        compression.encode(u.astype(np.float32), 8, 64, compression.rounding_rng(0, 1, i))
        for i, u in enumerate(updates)
    ]
    dp = ServerSideDp(strategy, 0.0, clip, 3)
    dp._setup(population=3, delta=1e-5, noise=np.random.default_rng(0))
    arrays, _ = dp.aggregate_train(
        1, [_compressed_reply(strategy, w, 10 * (i + 1)) for i, w in enumerate(wires)]
    )
    dequantised = [(g + compression.decode(w, n)).astype(np.float64) - g for w in wires]
    np.testing.assert_allclose(
        dp.rounds[1]["update_norms"], [np.linalg.norm(d) for d in dequantised], rtol=1e-6
    )
    clipped = np.mean([d * min(1.0, clip / np.linalg.norm(d)) for d in dequantised], axis=0)
    np.testing.assert_allclose(arrays["values"].numpy() - g, clipped, atol=1e-6)
    assert dp.rounds[1]["released"] and dp.rounds[1]["over_norm"] == 2 and strategy.accepted[1] == 3
