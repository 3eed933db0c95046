"""Checks of one client's reply, each returning why it must not be aggregated, or None."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedsparse.federation import compression
from fedsparse.federation.protocol import FINGERPRINT_KEY, INFO_KEY, METRICS_KEY, TRAIN_METRICS, WEIGHT_KEY

if TYPE_CHECKING:
    from fedsparse.methods import Method


def payload_problem(content: RecordDict, max_bytes: int) -> str | None:
    """The reply's arrays exceed what this method can send (checked before anything is decoded)."""
    size = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    if size > max_bytes:
        return f"reply carries {size:,} bytes of arrays, which exceeds the {max_bytes:,}-byte limit of this method"
    return None


def records_problem(content: RecordDict, arrays_key: str) -> str | None:
    """A train reply lacks one of the records the server reads."""
    if (
        arrays_key not in content.array_records
        or METRICS_KEY not in content.metric_records
        or INFO_KEY not in content.config_records
    ):
        return f"reply lacks '{arrays_key}', '{METRICS_KEY}' or '{INFO_KEY}' records"
    return None


def compressed_problem(arrays: ArrayRecord, method: Method) -> str | None:
    """A compressed reply's array names: `compressed` in place of `values` (the header, length and
    scales are checked by `compression.decode`)."""
    expected = (set(method.wire_keys) - {"values"}) | {compression.KEY}
    if set(arrays) != expected:
        return f"compressed reply has arrays {sorted(arrays)}, expected {sorted(expected)}"
    return None


def fingerprint_problem(seen: object, expected: str) -> str | None:
    """The client trained another checkpoint or method config than the server's."""
    if seen != expected:
        return "fingerprint differs from the server's (another checkpoint or method config)"
    return None


def arrays_problem(arrays: ArrayRecord, method: Method, size: int) -> str | None:
    """Array names, dtype, number of entries (or top-k's own wire check) and finite values."""
    if set(arrays) != set(method.wire_keys):
        return f"array names {sorted(arrays)} != {sorted(method.wire_keys)}"
    values = arrays["values"].numpy()
    if values.dtype != np.float32 or values.ndim != 1:
        return f"values have dtype {values.dtype} and {values.ndim} dims, expected 1-D float32"
    if "indices" in arrays:  # only a method that sends indices (top-k) gets here: it checks them
        problem = method.check_wire({k: a.numpy() for k, a in arrays.items()})
        if problem:
            return problem
    elif values.size != size:
        return f"values have {values.size} entries, expected {size}"
    if not np.isfinite(values).all():
        return "values contain NaN or Inf"
    return None


def metrics_problem(metrics: Mapping, max_examples: int, required: Collection[str] = ()) -> str | None:
    """Every required metric present, every metric a finite number, the weight a whole number in
    1..max_examples (a larger one would dominate the average)."""
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"metrics lack {missing}"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric '{key}' is {value!r}, expected a finite number"
    weight = metrics.get(WEIGHT_KEY)
    if weight is None or weight <= 0 or weight != int(weight) or weight > max_examples:
        return (
            f"'{WEIGHT_KEY}' is {weight!r}, expected a whole number in "
            f"1..{max_examples:,} (federation.max_examples)"
        )
    return None


def train_reply_problem(
    content: RecordDict,
    *,
    arrays_key: str,
    fingerprint: str,
    method: Method,
    size: int,
    max_examples: int,
    max_bytes: int,
) -> str | None:
    """Every check of a clear-text train reply, cheapest first."""
    problem = payload_problem(content, max_bytes) or records_problem(content, arrays_key)
    if problem:
        return problem
    return (
        fingerprint_problem(content[INFO_KEY].get(FINGERPRINT_KEY), fingerprint)
        or arrays_problem(content[arrays_key], method, size)
        or metrics_problem(content[METRICS_KEY], max_examples, TRAIN_METRICS)
    )


def masked_reply_problem(
    num_examples: int, metrics: Mapping, *, fingerprint: str, max_examples: int
) -> str | None:
    """Checks of a SecAgg+ client's clear-text metadata (its update is masked): its fingerprint,
    its metrics and its own num-examples."""
    reported = {k: v for k, v in metrics.items() if k != FINGERPRINT_KEY} | {WEIGHT_KEY: num_examples}
    return fingerprint_problem(metrics.get(FINGERPRINT_KEY), fingerprint) or metrics_problem(
        reported, max_examples, TRAIN_METRICS
    )
