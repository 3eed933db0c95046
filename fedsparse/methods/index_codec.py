"""Lossless encodings of a sorted index set {i_0 < i_1 < ...} within [0, n), for top-k's wire.

Every codec is vectorised with numpy (loops run over bit or byte positions, never over
indices) and its `decode` is a validator: the server decodes untrusted replies, so malformed
input raises `ValueError` with the reason and never yields an out-of-range, unsorted or
duplicated index set.

- `int32`: the indices themselves (4 bytes each).
- `varint`: gaps `d_j = i_j - i_{j-1} - 1` (`i_{-1} = -1`) as unsigned LEB128, 7 bits per byte.
- `rice`: the same gaps as Golomb-Rice codes with the best parameter `r` for the message:
  all `r`-bit remainders first, then all unary quotients (q zeros and a one), so both halves
  decode without a sequential scan. About log2(e / density) bits per index for uniform gaps.
- `expgolomb`: the gaps as Exp-Golomb codes of the best order `k` for the message: unary
  lengths first, then the variable-width mantissas. Near Rice on uniform gaps, and much
  smaller than Rice or varint on the bursty gaps of real top-k sets (clustered in rows).
- `bitmap`: one bit per candidate entry (wins only at very high density).
- `auto`: whichever of the above compact codes is smallest for this message (the tag byte
  says which), i.e. the strongest honest index code for a per-client support.

The compact codecs emit uint8 arrays that start with a tag byte naming the codec, so a
client and server configured with different codecs fail with a clear message.
"""

from __future__ import annotations

import numpy as np

_TAG_VARINT, _TAG_RICE, _TAG_BITMAP, _TAG_EXPGOLOMB = 1, 2, 3, 4
_TAG_NAMES = {_TAG_VARINT: "varint", _TAG_RICE: "rice", _TAG_BITMAP: "bitmap", _TAG_EXPGOLOMB: "expgolomb"}
_RICE_HEADER = 6  # tag, r, count as uint32 little-endian (Exp-Golomb: tag, order, count)
_MAX_EXACT = 2**53  # bit lengths come from float64 exponents, exact below this


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bits needed for each non-negative integer below 2^53 (0 for 0)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def _pack_fields(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Bits of each value in its own width, most significant first, concatenated (uint8 0/1)."""
    total = int(widths.sum())
    start = np.cumsum(widths) - widths
    owner = np.repeat(np.arange(widths.size), widths)
    shift = (np.repeat(start + widths, widths) - 1 - np.arange(total)).astype(np.uint64)
    return ((values[owner] >> shift) & np.uint64(1)).astype(np.uint8)


def _unpack_fields(bits: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_fields` (widths below 64; bits holds exactly sum(widths) bits)."""
    end = np.cumsum(widths)
    shift = (np.repeat(end, widths) - 1 - np.arange(bits.size)).astype(np.uint64)
    total = np.zeros(bits.size + 1, dtype=np.uint64)
    np.cumsum(bits.astype(np.uint64) << shift, out=total[1:])
    return total[end] - total[end - widths]  # the sum of all fields is bounded by the gaps' sum


def _unary_lengths(bits: np.ndarray, count: int, codec: str) -> tuple[np.ndarray, int]:
    """The first `count` unary codes (q zeros, then a one) of `bits`, and where they end."""
    ones = np.flatnonzero(bits)[:count]
    if ones.size < count:
        raise ValueError(f"{codec} indices: truncated ({ones.size} of {count} unary codes)")
    return np.diff(ones, prepend=-1) - 1, int(ones[-1]) + 1 if count else 0


def _check_padding(bits: np.ndarray, codec: str, count: int) -> None:
    if bits.size >= 8 or bits.any():
        raise ValueError(f"{codec} indices: bits after the {count} codes beyond byte padding")


def _gaps(index: np.ndarray, n: int) -> np.ndarray:
    """Validate an index set for encoding and return its gaps (`i_j - i_{j-1} - 1`, uint64)."""
    index = np.asarray(index)
    if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array, got {index.dtype} with {index.ndim} dims")
    index = index.astype(np.int64)
    gaps = np.diff(index, prepend=-1) - 1
    if index.size and (index[0] < 0 or index[-1] >= n or gaps.min() < 0):
        raise ValueError(f"indices must be strictly increasing within [0, {n})")
    return gaps.astype(np.uint64)


def _from_gaps(gaps: np.ndarray, n: int, codec: str) -> np.ndarray:
    """Indices from decoded gaps, rejecting any that leave [0, n)."""
    if gaps.size == 0:
        return np.zeros(0, dtype=np.int64)
    if gaps.max() >= n:  # checked before the sum so it cannot overflow
        raise ValueError(f"{codec} indices: a gap exceeds the {n} candidate entries")
    index = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if index[-1] >= n:
        raise ValueError(f"{codec} indices: index {index[-1]} out of range [0, {n})")
    return index


def _bytes(data: np.ndarray, codec: str, tag: int) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        got = f"{data.dtype} with {data.ndim} dims" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{codec} indices must be a 1-D uint8 array, got {got}")
    if data.size == 0:
        raise ValueError(f"{codec} indices: empty array (missing the tag byte)")
    if data[0] != tag:
        other = _TAG_NAMES.get(int(data[0]), f"unknown tag {int(data[0])}")
        raise ValueError(
            f"indices are encoded as {other} but this side expects {codec} "
            "(client and server must use the same method.index_encoding)"
        )
    return data[1:]


class Int32Codec:
    name = "int32"
    dtype = np.dtype(np.int32)

    def encode(self, index: np.ndarray, n: int) -> np.ndarray:
        _gaps(index, n)
        if n > np.iinfo(np.int32).max + 1:
            raise ValueError(f"{n} candidate entries do not fit int32 indices: use a compact encoding")
        return np.asarray(index).astype(np.int32)

    def decode(self, data: np.ndarray, n: int) -> np.ndarray:
        if not isinstance(data, np.ndarray) or data.dtype != np.int32 or data.ndim != 1:
            got = (
                f"{data.dtype} with {data.ndim} dims" if isinstance(data, np.ndarray) else type(data).__name__
            )
            raise ValueError(f"int32 indices must be a 1-D int32 array, got {got}")
        index = data.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"int32 indices out of range [0, {n})")
        if index.size > 1 and (np.diff(index) <= 0).any():
            raise ValueError("int32 indices must be strictly increasing (unsorted or duplicated)")
        return index


class VarintCodec:
    """Unsigned LEB128 of the gaps: low 7 bits first, high bit set on every byte but the last."""

    name = "varint"
    dtype = np.dtype(np.uint8)

    def encode(self, index: np.ndarray, n: int) -> np.ndarray:
        gaps = _gaps(index, n)
        length = np.ones(gaps.size, dtype=np.int64)
        rest = gaps >> np.uint64(7)
        while rest.any():
            length += rest > 0
            rest >>= np.uint64(7)
        out = np.empty(1 + int(length.sum()), dtype=np.uint8)
        out[0] = _TAG_VARINT
        start = 1 + np.cumsum(length) - length
        for b in range(int(length.max()) if gaps.size else 0):
            sel = length > b
            low = (gaps[sel] >> np.uint64(7 * b)) & np.uint64(0x7F)
            more = np.where(length[sel] > b + 1, 0x80, 0).astype(np.uint64)
            out[start[sel] + b] = (low | more).astype(np.uint8)
        return out

    def decode(self, data: np.ndarray, n: int) -> np.ndarray:
        body = _bytes(data, self.name, _TAG_VARINT)
        if body.size == 0:
            return np.zeros(0, dtype=np.int64)
        if body[-1] & 0x80:
            raise ValueError("varint indices: truncated (the last byte has its continuation bit set)")
        end = np.flatnonzero(body < 0x80)  # the last byte of every varint
        start = np.concatenate(([0], end[:-1] + 1))
        length = end - start + 1
        max_length = max(1, -(-max(n - 1, 1).bit_length() // 7))
        if length.max() > max_length:
            raise ValueError(f"varint indices: a varint longer than {max_length} bytes cannot be < {n}")
        if ((body[end] == 0) & (length > 1)).any():
            raise ValueError("varint indices: non-minimal varint (trailing zero byte)")
        shift = 7 * (np.arange(body.size) - np.repeat(start, length))
        parts = (body & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
        return _from_gaps(np.add.reduceat(parts, start), n, self.name)


class RiceCodec:
    """Golomb-Rice codes of the gaps with parameter r: gap = q * 2^r + remainder."""

    name = "rice"
    dtype = np.dtype(np.uint8)

    @staticmethod
    def best_parameter(gaps: np.ndarray, n: int) -> int:
        """The r minimising the encoded bits, sum(q + 1 + r), over every r that can matter."""
        if gaps.size == 0:
            return 0
        costs = [
            int((gaps >> np.uint64(r)).sum()) + gaps.size * (r + 1) for r in range(max(n, 2).bit_length())
        ]
        return int(np.argmin(costs))

    def encode(self, index: np.ndarray, n: int) -> np.ndarray:
        gaps = _gaps(index, n)
        if gaps.size > np.iinfo(np.uint32).max:
            raise ValueError("rice indices: more than 2^32 - 1 indices")
        r = self.best_parameter(gaps, n)
        quotient = (gaps >> np.uint64(r)).astype(np.int64)
        shifts = np.arange(r - 1, -1, -1, dtype=np.uint64)  # most significant bit first
        remainder = ((gaps[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)
        unary = np.zeros(int(quotient.sum()) + gaps.size, dtype=np.uint8)
        unary[np.cumsum(quotient + 1) - 1] = 1  # q zeros, then a one
        header = np.concatenate(([_TAG_RICE, r], np.array([gaps.size], "<u4").view(np.uint8)))
        return np.concatenate((header.astype(np.uint8), np.packbits(np.concatenate((remainder, unary)))))

    def decode(self, data: np.ndarray, n: int) -> np.ndarray:
        body = _bytes(data, self.name, _TAG_RICE)
        if body.size < _RICE_HEADER - 1:
            raise ValueError(f"rice indices: truncated header ({data.size} of {_RICE_HEADER} bytes)")
        r, count = int(body[0]), int(body[1:5].view("<u4")[0])
        if r >= max(n, 2).bit_length():
            raise ValueError(f"rice indices: parameter r={r} is too large for {n} candidate entries")
        if count > n:
            raise ValueError(f"rice indices: {count} indices cannot fit {n} candidate entries")
        bits = np.unpackbits(body[5:])
        if bits.size < count * (r + 1):
            raise ValueError(f"rice indices: truncated ({bits.size} bits for {count} codes)")
        remainder = bits[: count * r].reshape(count, r).astype(np.uint64)
        quotient, end = _unary_lengths(bits[count * r :], count, self.name)
        _check_padding(bits[count * r + end :], self.name, count)
        if count and quotient.max() > (n - 1) >> r:
            raise ValueError(f"rice indices: a gap exceeds the {n} candidate entries")
        value = quotient.astype(np.uint64) << np.uint64(r)
        if r:
            value |= (remainder << np.arange(r - 1, -1, -1, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
        return _from_gaps(value, n, self.name)


class BitmapCodec:
    """One bit per candidate entry, most significant bit first, zero padding."""

    name = "bitmap"
    dtype = np.dtype(np.uint8)

    def encode(self, index: np.ndarray, n: int) -> np.ndarray:
        _gaps(index, n)
        mask = np.zeros(n, dtype=bool)
        mask[np.asarray(index, dtype=np.int64)] = True
        return np.concatenate(([np.uint8(_TAG_BITMAP)], np.packbits(mask)))

    def decode(self, data: np.ndarray, n: int) -> np.ndarray:
        body = _bytes(data, self.name, _TAG_BITMAP)
        if body.size != -(-n // 8):
            raise ValueError(f"bitmap indices: {body.size} bytes, expected {-(-n // 8)} for {n} entries")
        bits = np.unpackbits(body)
        if bits[n:].any():
            raise ValueError("bitmap indices: padding bits beyond the last entry are set")
        return np.flatnonzero(bits[:n]).astype(np.int64)


class ExpGolombCodec:
    """Exp-Golomb codes of order k: m = (gap >> k) + 1 as L = bit_length(m) - 1 zeros and a one,
    then the L low bits of m and the k low bits of the gap. Stored as a header (tag, k, count),
    all unary parts, then all L + k bit mantissas, so decoding needs no sequential scan."""

    name = "expgolomb"
    dtype = np.dtype(np.uint8)

    @staticmethod
    def _lengths(gaps: np.ndarray, order: int) -> np.ndarray:
        return _bit_length((gaps >> np.uint64(order)) + np.uint64(1)) - 1

    def best_order(self, gaps: np.ndarray, n: int) -> int:
        if gaps.size == 0:
            return 0
        costs = [
            2 * int(self._lengths(gaps, k).sum()) + gaps.size * (k + 1) for k in range(max(n, 2).bit_length())
        ]
        return int(np.argmin(costs))

    def encode(self, index: np.ndarray, n: int) -> np.ndarray:
        gaps = _gaps(index, n)
        if n > _MAX_EXACT or gaps.size > np.iinfo(np.uint32).max:
            raise ValueError("expgolomb indices: at most 2^53 candidates and 2^32 - 1 indices")
        k = self.best_order(gaps, n)
        length = self._lengths(gaps, k)
        unary = np.zeros(int(length.sum()) + gaps.size, dtype=np.uint8)
        unary[np.cumsum(length + 1) - 1] = 1
        low = gaps & np.uint64((1 << k) - 1)
        m = (gaps >> np.uint64(k)) + np.uint64(1)
        mantissa = ((m - (np.uint64(1) << length.astype(np.uint64))) << np.uint64(k)) | low
        bits = np.concatenate((unary, _pack_fields(mantissa, length + k)))
        header = np.concatenate(([_TAG_EXPGOLOMB, k], np.array([gaps.size], "<u4").view(np.uint8)))
        return np.concatenate((header.astype(np.uint8), np.packbits(bits)))

    def decode(self, data: np.ndarray, n: int) -> np.ndarray:
        body = _bytes(data, self.name, _TAG_EXPGOLOMB)
        if body.size < _RICE_HEADER - 1:
            raise ValueError(f"expgolomb indices: truncated header ({data.size} of {_RICE_HEADER} bytes)")
        k, count = int(body[0]), int(body[1:5].view("<u4")[0])
        if n > _MAX_EXACT or k >= max(n, 2).bit_length():
            raise ValueError(f"expgolomb indices: order k={k} is too large for {n} candidate entries")
        if count > n:
            raise ValueError(f"expgolomb indices: {count} indices cannot fit {n} candidate entries")
        bits = np.unpackbits(body[5:])
        length, end = _unary_lengths(bits, count, self.name)
        top = (n - 1) >> k  # the largest m - 1 that keeps a gap below n
        if count and length.max() > top.bit_length():
            raise ValueError(f"expgolomb indices: a gap exceeds the {n} candidate entries")
        width = length + k
        payload = bits[end:]
        if payload.size < width.sum():
            raise ValueError(f"expgolomb indices: truncated ({payload.size} of {width.sum()} mantissa bits)")
        _check_padding(payload[width.sum() :], self.name, count)
        mantissa = _unpack_fields(payload[: width.sum()], width)
        m_minus_1 = (mantissa >> np.uint64(k)) + (np.uint64(1) << length.astype(np.uint64)) - np.uint64(1)
        if count and m_minus_1.max() > top:
            raise ValueError(f"expgolomb indices: a gap exceeds the {n} candidate entries")
        gaps = (m_minus_1 << np.uint64(k)) | (mantissa & np.uint64((1 << k) - 1))
        return _from_gaps(gaps, n, self.name)


class AutoCodec:
    """The smallest compact code for each message; the tag byte tells the decoder which."""

    name = "auto"
    dtype = np.dtype(np.uint8)

    def encode(self, index: np.ndarray, n: int) -> np.ndarray:
        best = min((CODECS[c].encode(index, n) for c in ("varint", "rice", "expgolomb")), key=len)
        if 1 + -(-n // 8) < best.size:  # a bitmap's size is known without building it
            best = CODECS["bitmap"].encode(index, n)
        return best

    def decode(self, data: np.ndarray, n: int) -> np.ndarray:
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and data.size:
            if int(data[0]) not in _TAG_NAMES:
                raise ValueError(f"auto indices: unknown encoding tag {int(data[0])}")
            return CODECS[_TAG_NAMES[int(data[0])]].decode(data, n)
        return _bytes(data, self.name, 0)  # raises with the reason


CODECS = {
    c.name: c
    for c in (Int32Codec(), VarintCodec(), RiceCodec(), ExpGolombCodec(), BitmapCodec(), AutoCodec())
}


def get_codec(name: str):
    if name not in CODECS:
        raise ValueError(f"index_encoding={name!r}: choose one of {', '.join(CODECS)}")
    return CODECS[name]


def encode_indices(index: np.ndarray, n: int, encoding: str) -> np.ndarray:
    """Encode strictly increasing indices within [0, n)."""
    return get_codec(encoding).encode(index, n)


def decode_indices(data: np.ndarray, n: int, encoding: str) -> np.ndarray:
    """Decode to strictly increasing int64 indices within [0, n); ValueError if malformed."""
    return get_codec(encoding).decode(data, n)
