"""Top-k index encodings: exact round trips, malformed input refused, compact sizes, server use."""

from __future__ import annotations

import numpy as np
import pytest
from harness.models import method_cfg, packed_strategy, tiny_model
from harness.replies import train_reply

from fedsparse.federation.accounting import CommLedger, message_sizes
from fedsparse.federation.strategy import PackedFedAvg
from fedsparse.methods import build_method
from fedsparse.methods.index_codec import CODECS, decode_indices, encode_indices, get_codec

COMPACT = ["varint", "rice", "expgolomb", "bitmap", "auto"]
N_MINILM = 10_616_832  # MiniLM's attention + FFN candidate entries


def _random_set(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(n, size=k, replace=False))


EDGE_CASES = {
    "empty": (np.array([], dtype=np.int64), 1000),
    "index 0": (np.array([0]), 1000),
    "max index": (np.array([999]), 1000),
    "both ends": (np.array([0, 999]), 1000),
    "n = 1": (np.array([0]), 1),
    "all entries": (np.arange(1000), 1000),
    "consecutive": (np.arange(500, 700), 1000),
    "gaps >= 2^28": (np.array([0, 2**28, 2**28 + 1, 2**29 + 5, 3 * 2**30 - 1]), 3 * 2**30),
    "gap 2^35 near 2^36": (np.array([3, 2**35 + 3, 2**36 - 1]), 2**36),
    "7-bit boundaries": (np.cumsum([0, 127, 128, 16383, 16384, 16385]) + np.arange(6), 100_000),
}


@pytest.mark.parametrize("encoding", list(CODECS))
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_round_trip_edge_cases(encoding, case):
    index, n = EDGE_CASES[case]
    if encoding == "int32" and n > 2**31:
        with pytest.raises(ValueError, match="compact encoding"):
            encode_indices(index, n, encoding)
        return
    if encoding == "bitmap" and n > 2**24:
        return  # the 2^28-gap case would build a 384 MiB bitmap (30 s) that proves nothing new
    data = encode_indices(index, n, encoding)
    assert data.dtype == get_codec(encoding).dtype and data.ndim == 1
    out = decode_indices(data, n, encoding)
    assert out.dtype == np.int64 and np.array_equal(out, index)


@pytest.mark.parametrize("encoding", list(CODECS))
@pytest.mark.parametrize("density", [0.0001, 0.005, 0.1, 0.7])
def test_round_trip_random_sets(encoding, density):
    rng = np.random.default_rng(int(density * 1e4))
    for n in (1, 37, 100_003):
        index = _random_set(rng, n, max(1, round(density * n)))
        assert np.array_equal(decode_indices(encode_indices(index, n, encoding), n, encoding), index)
    # clustered supports (whole rows), as real top-k updates tend to be
    rows = np.sort(rng.choice(1000, 20, replace=False))
    index = (rows[:, None] * 384 + np.arange(384)).reshape(-1)
    assert np.array_equal(decode_indices(encode_indices(index, 384_000, encoding), 384_000, encoding), index)


@pytest.mark.parametrize("encoding", list(CODECS))
def test_encoder_refuses_unsorted_duplicate_or_out_of_range_sets(encoding):
    for bad in ([3, 2], [2, 2], [-1, 4], [5, 1000]):
        with pytest.raises(ValueError, match="strictly increasing"):
            encode_indices(np.array(bad), 1000, encoding)


def test_compact_encodings_beat_int32_at_half_a_percent_of_minilm():
    rng = np.random.default_rng(0)
    k = round(0.005 * N_MINILM)
    index = _random_set(rng, N_MINILM, k)
    size = {name: encode_indices(index, N_MINILM, name).nbytes for name in CODECS}
    assert size["int32"] == 4 * k
    assert size["varint"] < 0.55 * size["int32"]  # gaps of ~200: mostly 2 bytes
    assert size["rice"] < 0.31 * size["int32"]  # ~log2(e / 0.005) = 9.1 bits per index
    assert size["expgolomb"] < 0.32 * size["int32"]
    assert size["rice"] < size["varint"] < size["int32"] < size["bitmap"]
    assert size["auto"] == min(size[c] for c in ("varint", "rice", "expgolomb", "bitmap"))
    # bursty gaps (runs inside a few hundred rows, as in real top-k sets): Exp-Golomb wins
    rows = np.sort(rng.choice(N_MINILM // 384, 1000, replace=False))
    runs = (rows[:, None] * 384 + np.sort(rng.choice(384, 53, replace=False))).reshape(-1)
    size = {name: encode_indices(runs, N_MINILM, name).nbytes for name in CODECS}
    assert size["expgolomb"] < min(size["varint"], size["rice"]) and size["auto"] == size["expgolomb"]
    # at 70% density a bitmap (1 bit per entry) is the smallest
    dense = _random_set(rng, 100_000, 70_000)
    size = {name: encode_indices(dense, 100_000, name).nbytes for name in CODECS}
    assert min(size, key=size.get) == "bitmap"


def _malformed(encoding: str, n: int) -> dict[str, np.ndarray]:
    index = np.array([0, 5, 300, 70_000, n - 1])
    good = encode_indices(index, n, encoding)
    cases = {
        "wrong dtype": good.astype(np.int64),
        "2-D": good.reshape(1, -1),
    }
    if encoding == "int32":
        cases |= {
            "out of range": np.array([0, n], np.int32),
            "negative": np.array([-1, 3], np.int32),
            "unsorted": np.array([5, 3], np.int32),
            "duplicate": np.array([3, 3], np.int32),
        }
        return cases
    cases |= {"empty array": np.zeros(0, np.uint8)}
    if encoding == "auto":  # dispatches on the tag: every codec's malformed input stays malformed
        cases["unknown tag"] = np.array([9, 0, 0], np.uint8)
        for codec in ("varint", "rice", "expgolomb", "bitmap"):
            inner = _malformed(codec, n)
            del inner["another codec's tag"]
            cases |= {f"{codec}: {case}": data for case, data in inner.items()}
        return cases
    other = next(e for e in COMPACT if e != encoding)
    cases |= {
        "another codec's tag": encode_indices(index, n, other),
        "trailing junk": np.concatenate([good, np.array([1], np.uint8)]),
    }
    if encoding == "varint":
        cases |= {
            "truncated varint": good[:-1],
            "varint too long": np.array([1, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], np.uint8),
            "non-minimal varint": np.array([1, 0x80, 0x00], np.uint8),
            "past the end": encode_indices(np.array([n - 2]), n, encoding).copy(),
        }
        cases["past the end"][-1] += 2
    elif encoding in ("rice", "expgolomb"):
        huge_count = good.copy()
        huge_count[2:6] = np.array([2**32 - 1], "<u4").view(np.uint8)
        big_parameter = good.copy()
        big_parameter[1] = 60
        cases |= {
            "truncated header": good[:4],
            "truncated codes": good[:-2],
            "count above n": huge_count,
            "parameter too large": big_parameter,
            "count too small": np.concatenate([good[:2], np.array([4], "<u4").view(np.uint8), good[6:]]),
            "header only": encode_indices(np.array([n - 1]), n, encoding)[:6],
        }
        # one code whose gap is n: all-zero unary prefix long enough, then the rest
        gap_n = np.concatenate([good[:2], np.array([1], "<u4").view(np.uint8)])
        cases["gap of n"] = np.concatenate([gap_n, np.packbits(_code_bits(encoding, n, int(good[1])))])
    else:
        padded = good.copy()
        padded[-1] |= 1  # n is not a multiple of 8: the last bit is padding
        cases |= {"truncated bitmap": good[:-1], "padding bit set": padded}
    return cases


def _code_bits(encoding: str, gap: int, parameter: int) -> np.ndarray:
    """The bits of one Rice / Exp-Golomb code for `gap` (written out by hand, per the format)."""
    if encoding == "rice":
        q, rem = gap >> parameter, gap & ((1 << parameter) - 1)
        remainder = [int(b) for b in format(rem, f"0{parameter}b")] if parameter else []
        return np.array(remainder + [0] * q + [1], np.uint8)
    m = (gap >> parameter) + 1
    length = m.bit_length() - 1
    mantissa = ((m - (1 << length)) << parameter) | (gap & ((1 << parameter) - 1))
    width = length + parameter
    return np.array(
        [0] * length + [1] + ([int(b) for b in format(mantissa, f"0{width}b")] if width else []), np.uint8
    )


@pytest.mark.parametrize("encoding", ["rice", "expgolomb"])
def test_hand_written_codes_decode(encoding):
    """The format as documented: a header (tag, parameter, count) and then the code bits."""
    n, gap = 100_003, 70_000
    for parameter in (0, 3, 12, 16):
        tag = {"rice": 2, "expgolomb": 4}[encoding]
        data = np.concatenate(
            [np.array([tag, parameter], np.uint8), np.array([1], "<u4").view(np.uint8)]
            + [np.packbits(_code_bits(encoding, gap, parameter))]
        )
        assert decode_indices(data, n, encoding).tolist() == [gap]


@pytest.mark.parametrize("encoding", list(CODECS))
def test_malformed_input_is_refused_with_a_value_error(encoding):
    n = 100_003
    for case, data in _malformed(encoding, n).items():
        with pytest.raises(ValueError) as err:
            decode_indices(data, n, encoding)
        if encoding != "auto":
            assert encoding in str(err.value) or "encoded as" in str(err.value), case


@pytest.mark.parametrize("encoding", COMPACT)
def test_random_corruption_never_yields_an_invalid_set(encoding):
    """Flip random bytes: decoding either refuses or returns a valid sorted in-range set."""
    rng = np.random.default_rng(1)
    n = 50_000
    good = encode_indices(_random_set(rng, n, 500), n, encoding)
    for _ in range(300):
        data = good.copy()
        data[rng.integers(1, data.size, 3)] = rng.integers(0, 256, 3, dtype=np.uint8)
        try:
            out = decode_indices(data, n, encoding)
        except ValueError:
            continue
        assert out.size == 0 or (out[0] >= 0 and out[-1] < n and (np.diff(out) > 0).all())


def test_unknown_encoding_names_the_choices():
    with pytest.raises(ValueError, match="int32, varint, rice, expgolomb, bitmap, auto"):
        build_method(tiny_model(), method_cfg("topk", index_encoding="zstd"))


# --- the server: a compact reply is validated and averaged exactly like an int32 one ----------


def _topk_strategy(encoding: str) -> PackedFedAvg:
    return packed_strategy(
        build_method(tiny_model(), method_cfg("topk", density=0.05, index_encoding=encoding))
    )


def _round(encoding: str, locals_: list[np.ndarray], bad: bool = True):
    """One round of two good top-k replies (weights 10 and 30) and, if `bad`, three broken ones;
    the replies are also measured into a ledger, as the server's grid measures them."""
    strat = _topk_strategy(encoding)
    method, g = strat.method, strat.global_values
    wires = [method.encode(v, reference=g) for v in locals_]
    if bad:
        w = wires[0]
        other = "rice" if encoding != "rice" else "varint"
        sent = decode_indices(w["indices"], method.body_size, encoding)
        foreign = encode_indices(sent, method.body_size, other)
        if encoding == "auto":  # accepts every compact code: send an unknown one
            foreign = np.array([9, 0, 0], np.uint8)
        wires += [
            {"values": w["values"], "indices": w["indices"][:-1]},
            {"values": w["values"][1:], "indices": w["indices"]},
            {"values": w["values"], "indices": foreign},
        ]
    replies = [train_reply(w, weight, strat.fingerprint) for w, weight in zip(wires, (10, 30, 5, 5, 5))]
    ledger = CommLedger(method.head_size)
    for reply, size in zip(replies, message_sizes(replies)):
        ledger.add(1, "train", "up", 0, size, reply.content)
    arrays, _ = strat.aggregate_train(1, replies)
    return strat, arrays["values"].numpy(), wires, ledger


@pytest.mark.parametrize("encoding", COMPACT)
def test_server_accepts_compact_topk_replies_and_averages_them_like_int32(encoding, app_identity):
    g = _topk_strategy("int32").global_values
    rng = np.random.default_rng(0)
    locals_ = [g + rng.normal(0, 1e-2, g.size).astype(np.float32) for _ in range(2)]
    base, expected, _, base_ledger = _round("int32", locals_, bad=False)
    strat, got, wires, ledger = _round(encoding, locals_)
    assert np.array_equal(got, expected)  # bitwise: the same dense replies reach FedAvg
    assert not (got == g).all() and not base.rejected.get(1)
    assert len(strat.rejected[1]) == 3
    reasons = " | ".join(strat.rejected[1])
    assert ("unknown encoding tag" if encoding == "auto" else "encoded as") in reasons
    assert "values for" in reasons
    # the ledger counts the uint8 arrays as index bytes; except a bitmap at the tiny model's 5%
    # density, they are smaller than int32 indices
    k = strat.method.k
    assert base_ledger.summary(1)["up"]["indices"] == 2 * 4 * k
    assert ledger.summary(1)["up"]["indices"] == sum(w["indices"].nbytes for w in wires)
    if encoding != "bitmap":
        assert wires[0]["indices"].nbytes < 4 * k
