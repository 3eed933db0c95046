"""Compressed uplink and downlink: an update quantised to `bits` per value with one float32 scale
per block. A compressed downlink (`downlink_bits`) carries the same array for the change of the
global, next to the 16-byte digest (`global_digest`) of the global it applies to (`base`); the
server's new global is `apply_delta(previous, array)` (docs/methods.md, Compressed downlink).

Wire format, one uint8 array per reply (key `compressed`, in place of `values`):

    offset  size               field
    0       2                  magic b"FQ"
    2       1                  version (1)
    3       1                  bits per value: 1, 2, 4 or 8
    4       4                  block: values per scale (uint32, little-endian)
    8       4                  n: number of values (uint32, little-endian)
    12      4 * ceil(n/block)  scales (float32, little-endian): max |x| over each block
                               (mean |x| under rounding="sign")
    ...     ceil(n*bits/8)     codes, packed little-end first within each byte

so a message carries `HEADER + 4 * ceil(n / block) + ceil(n * bits / 8)` bytes of payload.

Each value x of a block with scale s is rounded to one of L = 2^bits levels spread evenly over
[-s, s] (step 2s/(L-1); 1 bit: {-s, +s}), up with probability equal to its distance from the
level below in steps: unbiased, E[q(x)] = x. The error of one value is below one step, 2s/(L-1),
and its variance is p(1-p) step^2 <= s^2/(L-1)^2. The uniform draws come from a generator
seeded by (seed, round, partition): the rounding is public, reproducible and resumes exactly.

`rounding="sign"` (1 bit only: `compression.rounding` applies to each direction sent at 1 bit,
see `rounding_at`) is the biased scaled sign of EF-SignSGD instead: the block's scale is its
mean |x| and each value is sent as +s or -s by its sign, no draws. Its error per block,
||x||^2 - ||x||_1^2 / block, is below the block's energy, so error feedback's residual grows only
slowly (docs/methods.md, Quantiser); without it the bias stays (an exact 0 is always sent as +s),
so the config requires the direction's error feedback. The wire format is the same (1-bit
codes, {-s, +s}).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

MAGIC = b"FQ"
VERSION = 1
HEADER = 12
BITS = (1, 2, 4, 8)
ROUNDINGS = ("stochastic", "sign")  # unbiased stochastic rounding; the biased scaled sign (1 bit)
UPLINK_OFF = {"bits": 32, "error_feedback": False}  # conf/compression/none.yaml: the uncompressed uplink
KEY = "compressed"  # the array name of a compressed update in a train reply
_STREAM = 0x51  # tells the rounding generator apart from the clients' other seeded draws
_DOWN_STREAM = 0x52  # the server's rounding of the downlink delta
# Why error feedback is refused at 1 bit (docs/methods.md, Error feedback; tests/test_compression.py).
ONE_BIT_FEEDBACK = (
    "error feedback diverges at 1 bit: the unbiased 1-bit rounding's error is several times the "
    "update itself, so the residual carried into the next round grows every round (measured: "
    "PaFi's loss above 1,000 by round 15); use 2 bits, the scaled sign (compression.rounding=sign) "
    "or switch the error feedback off"
)
SIGN_NEEDS_FEEDBACK = (
    "the scaled sign is biased (every value of a block is sent at the block's mean size, an exact 0 "
    "as +s) and only error feedback corrects that; switch that direction's feedback on, or use "
    "rounding=stochastic"
)
BASE_KEY = "base"  # a compressed downlink's array: the digest of the global its delta applies to
DIGEST_BYTES = 16


def global_digest(values: np.ndarray) -> bytes:
    """The first 16 bytes of the SHA-256 of a global vector's little-endian float32 bytes: what a
    compressed downlink names its base by, and what a client reports it holds."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).digest()[:DIGEST_BYTES]


def downlink_rng(seed: int, server_round: int) -> np.random.Generator:
    """The server's rounding of round `server_round`'s downlink delta (public, like the uplink's)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(server_round), _DOWN_STREAM]))


def apply_delta(
    base: np.ndarray, wire: np.ndarray, bits: int | None = None, block: int | None = None
) -> np.ndarray:
    """The global a compressed downlink stands for: `base` plus the dequantised delta, in float32.
    The server computes its new global with this same function, so both agree bit for bit."""
    base = np.asarray(base, dtype=np.float32)
    return base + decode(wire, base.size, bits, block)


def rounding_rng(seed: int, server_round: int, partition: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), int(server_round), int(partition), _STREAM])
    )


def configured_rounding(section: Mapping | None) -> str:
    """`compression.rounding` of a compression config section, "stochastic" when absent."""
    return ROUNDINGS[0] if section is None else str(section.get("rounding", ROUNDINGS[0]))


def rounding_at(section: Mapping | None, bits: int) -> str:
    """The rounding of a direction sent at `bits`: the configured one at 1 bit, else stochastic
    (the scaled sign is a 1-bit compressor)."""
    return configured_rounding(section) if bits == 1 else ROUNDINGS[0]


def payload_bytes(n: int, bits: int, block: int) -> int:
    """Bytes of the encoded array for n values."""
    return HEADER + 4 * -(-n // block) + -(-n * bits // 8)


def _step(scales: np.ndarray, bits: int) -> np.ndarray:
    return 2.0 * scales.astype(np.float64) / (2**bits - 1)


def _blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """|x| as rows of `block` values, the last one padded with zeros, and the padding's length."""
    pad = -x.size % block
    return np.abs(np.concatenate([x, np.zeros(pad, x.dtype)])).reshape(-1, block).astype(np.float64), pad


def block_scales(x: np.ndarray, block: int) -> np.ndarray:
    """max |x| over each block of `block` values (the last block may be shorter)."""
    return _blocks(x, block)[0].max(axis=1).astype(np.float32)


def block_means(x: np.ndarray, block: int) -> np.ndarray:
    """mean |x| over each block of `block` values (the shorter last block's over its own values)."""
    a, pad = _blocks(x, block)
    counts = np.full(a.shape[0], block)
    if pad:
        counts[-1] -= pad
    return (a.sum(axis=1) / counts).astype(np.float32)


def quantise(
    x: np.ndarray, bits: int, block: int, rng: np.random.Generator, rounding: str = "stochastic"
) -> tuple[np.ndarray, np.ndarray]:
    """(codes in 0..2^bits-1 as uint8, per-block scales) of float vector x, stochastically rounded
    (or, with rounding="sign" at 1 bit, the scaled sign: code 1 where x >= 0, scale mean |x|)."""
    if bits not in BITS:
        raise ValueError(f"compression.bits={bits}: use one of {BITS}")
    if rounding not in ROUNDINGS or rounding == "sign" and bits != 1:
        raise ValueError(
            f"compression.rounding={rounding} with bits={bits}: use {ROUNDINGS[0]}, or sign at 1 bit"
        )
    x = np.asarray(x, dtype=np.float32)
    if rounding == "sign":
        return (x >= 0).astype(np.uint8), block_means(x, block)
    scales = block_scales(x, block)
    s = np.repeat(scales.astype(np.float64), block)[: x.size]
    step = np.repeat(_step(scales, bits), block)[: x.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        u = np.where(step > 0, (x + s) / step, 0.0)  # position on the grid, in steps
    low = np.floor(u)
    codes = low + (rng.random(x.size) < u - low)
    return np.clip(codes, 0, 2**bits - 1).astype(np.uint8), scales


def dequantise(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    n = codes.size
    s = np.repeat(scales.astype(np.float64), block)[:n]
    step = np.repeat(_step(scales, bits), block)[:n]
    return (codes * step - s).astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    padded = np.concatenate([codes, np.zeros(-codes.size % per, np.uint8)]).reshape(-1, per)
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return np.bitwise_or.reduce(padded << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n].astype(np.uint8)


def encode(
    update: np.ndarray, bits: int, block: int, rng: np.random.Generator, rounding: str = "stochastic"
) -> np.ndarray:
    """The wire array of `update` (see the module doc)."""
    if block < 1:
        raise ValueError(f"compression.block={block}: must be >= 1")
    codes, scales = quantise(update, bits, block, rng, rounding)
    header = MAGIC + bytes([VERSION, bits]) + np.array([block, codes.size], "<u4").tobytes()
    body = np.concatenate(
        [np.frombuffer(header, np.uint8), scales.astype("<f4").view(np.uint8), _pack(codes, bits)]
    )
    return body.astype(np.uint8, copy=False)


def read_header(array: np.ndarray) -> tuple[int, int, int]:
    """(bits, block, n) of a wire array, or ValueError with the reason."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(
            f"compressed update has dtype {array.dtype} and {array.ndim} dims, expected 1-D uint8"
        )
    if array.size < HEADER:
        raise ValueError(f"compressed update has {array.size} bytes, less than its {HEADER}-byte header")
    head = array[:HEADER].tobytes()
    if head[:2] != MAGIC or head[2] != VERSION:
        raise ValueError(
            f"compressed update header {head[:3]!r} does not start with the magic {MAGIC!r}, version {VERSION}"
        )
    bits = head[3]
    block, n = (int(v) for v in np.frombuffer(head[4:12], "<u4"))
    if bits not in BITS or block < 1:
        raise ValueError(
            f"compressed update has bits={bits}, block={block}: expected bits in {BITS}, block >= 1"
        )
    return bits, block, n


def decode(
    array: np.ndarray, expected_n: int, bits: int | None = None, block: int | None = None
) -> np.ndarray:
    """The dequantised float32 update of a wire array; ValueError with the reason when its header,
    length or scales are malformed, or (when given) its bits/block differ from the run's."""
    got_bits, got_block, n = read_header(array)
    if bits is not None and got_bits != bits or block is not None and got_block != block:
        raise ValueError(
            f"compressed update uses bits={got_bits}, block={got_block}; this run uses bits={bits}, block={block}"
        )
    if n != expected_n:
        raise ValueError(f"compressed update has n={n} values, expected {expected_n}")
    size = payload_bytes(n, got_bits, got_block)
    if array.size != size:
        raise ValueError(f"compressed update has {array.size} bytes, its header implies {size}")
    nblocks = -(-n // got_block)
    scales = array[HEADER : HEADER + 4 * nblocks].view("<f4").astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError("compressed update has a NaN, infinite or negative scale")
    codes = _unpack(array[HEADER + 4 * nblocks :], got_bits, n)
    return dequantise(codes, scales, got_bits, got_block)


def _override(value: object) -> str:
    """A setting's value as a command-line override writes it (booleans lowercase)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_problems(cfg) -> list[str]:
    """Settings and combinations a compressed uplink refuses, each with why."""
    c = cfg.get("compression")
    if c is None:
        return []
    down = downlink_bits(cfg)
    down_feedback = c.get("downlink_error_feedback", False)
    rounding = configured_rounding(c)
    ignored = (
        []
        if c.enabled
        else [f"compression.{k}={_override(c[k])}" for k, off in UPLINK_OFF.items() if c[k] != off]
    )
    if not (c.enabled or down or down_feedback or rounding != "stochastic" or ignored):
        return []
    problems = []
    if ignored:
        problems.append(
            f"{', '.join(ignored)} would do nothing: the uplink is not compressed (compression=none); "
            "add compression=uplink (or compression=both for the downlink too)"
        )
    if down and down not in BITS:
        problems.append(f"compression.downlink_bits={down}: use one of {BITS}, or 0 (off)")
    if down_feedback and not down:
        problems.append(
            "compression.downlink_error_feedback=true needs a compressed downlink: set "
            "compression.downlink_bits (e.g. 2) or drop the setting"
        )
    if c.enabled and c.bits not in BITS:
        problems.append(f"compression.bits={c.bits}: use one of {BITS} (or compression=none)")
    one_bit = [  # (bits key, its feedback key, feedback on) of each direction sent at 1 bit
        (bits_key, feedback_key, feedback)
        for on, bits_key, feedback_key, feedback in (
            (c.enabled and c.bits == 1, "bits", "error_feedback", c.error_feedback),
            (down == 1, "downlink_bits", "downlink_error_feedback", down_feedback),
        )
        if on
    ]
    if rounding not in ROUNDINGS:
        problems.append(f"compression.rounding={rounding}: use one of {ROUNDINGS}")
    elif rounding == "sign" and not one_bit:
        problems.append(
            "compression.rounding=sign is the scaled sign of a direction sent at 1 bit: set "
            "compression=uplink with compression.bits=1, or compression.downlink_bits=1, or drop it"
        )
    for bits_key, feedback_key, feedback in one_bit:  # 1 bit: unbiased without feedback, sign with
        if rounding == "sign" and not feedback:
            problems.append(f"compression.rounding=sign with {feedback_key}=false: {SIGN_NEEDS_FEEDBACK}")
        elif rounding != "sign" and feedback:
            problems.append(f"compression.{bits_key}=1 with {feedback_key}=true: {ONE_BIT_FEEDBACK}")
    if not 1 <= c.block < 2**32:
        problems.append(f"compression.block={c.block}: must be >= 1")
    p = cfg.get("privacy", {})
    if down and p.get("secagg", False):
        problems.append(
            "compression.downlink_bits cannot be used with privacy.secagg=true: the SecAgg+ runner "
            "does not read the clients' reports of the global they hold (untested; off)"
        )
    if down and p.get("dp", "none") in ("server", "client"):
        problems.append(
            f"compression.downlink_bits cannot be used with privacy.dp={p.dp}: the DP wrapper adds "
            "its noise after the strategy quantised the global, so the clients could not rebuild it"
        )
    if not c.enabled:
        return problems
    if p.get("secagg", False):
        problems.append(
            "compression cannot be used with privacy.secagg=true: SecAgg+ quantises each update to "
            "its own integer range (privacy.secagg_quantization_range) and sums masked integers; "
            "block-scaled codes from different clients cannot be summed under masks"
        )
    if p.get("dp", "none") in ("client", "local"):
        problems.append(
            f"compression cannot be used with privacy.dp={p.dp}: the client's DP mod clips (and "
            "noises) the reply's float values after the handler, and a compressed reply carries "
            "codes; use privacy.dp=server (clipped and noised after decompression)"
        )
    return problems


def downlink_bits(cfg) -> int:
    """`compression.downlink_bits`, 0 (off, every downlink the full float32 vector) when absent."""
    c = cfg.get("compression")
    return 0 if c is None else int(c.get("downlink_bits", 0) or 0)
