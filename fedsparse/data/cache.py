"""A node-local disk cache for what a deployment ClientApp would otherwise recompute per message.

In deployment every message starts a fresh `flwr-clientapp` process, so the per-process
`lru_cache`s never hit: each message would recompute PaFi's mask and re-read, partition and
tokenise the node's shard. This cache keeps both on the node's disk, keyed by a digest of
everything that determines them (see `key`), written atomically (a temporary file, then a
rename), so concurrent ClientApp processes never read a half-written entry. Every entry
carries a checksum of its arrays; an entry that fails the checksum or the caller's own check
is deleted and recomputed, so the cache can make a message faster but never change its result.

`FEDSPARSE_CACHE=off` disables it; `FEDSPARSE_CACHE_DIR` moves it (default
`$XDG_CACHE_HOME/fedsparse`, i.e. `~/.cache/fedsparse`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedsparse.atomic import write_atomic

log = logging.getLogger(__name__)
VERSION = 1  # bump when what an entry holds, or how it is computed, changes
CHECKSUM = "__checksum__"
Arrays = dict[str, np.ndarray]


def cache_dir() -> Path | None:
    """The cache directory, or None when `FEDSPARSE_CACHE` is off/0/false/no."""
    if os.environ.get("FEDSPARSE_CACHE", "on").strip().lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("FEDSPARSE_CACHE_DIR"):
        return Path(os.environ["FEDSPARSE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedsparse"


def key(kind: str, **parts: object) -> str:
    """Digest of `parts` (JSON) with the cache version and the versions of the libraries whose
    algorithms the entry depends on; `kind` names the entry's file prefix."""
    versions = {p: _version(p) for p in ("torch", "transformers", "tokenizers", "datasets", "flwr-datasets")}
    blob = json.dumps(
        {"kind": kind, "version": VERSION, "libs": versions, **parts}, sort_keys=True, default=str
    )
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def checksum(arrays: Arrays) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def load(entry: str) -> Arrays | None:
    """The arrays stored under `entry`, or None (disabled, missing, unreadable or corrupted)."""
    root = cache_dir()
    path = root / f"{entry}.npz" if root else None
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
        if str(arrays.pop(CHECKSUM)) != checksum(arrays):
            raise ValueError("checksum mismatch")
        return arrays
    except Exception as err:  # any damage: drop the entry and recompute
        log.warning("fedsparse cache: ignoring %s (%s: %s)", path, type(err).__name__, err)
        path.unlink(missing_ok=True)
        return None


def save(entry: str, arrays: Arrays) -> None:
    """Store atomically; a read-only or full disk only costs the speed-up, never the run."""
    root = cache_dir()
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(
            root / f"{entry}.npz", lambda f: np.savez(f, **arrays, **{CHECKSUM: np.array(checksum(arrays))})
        )
    except OSError as err:
        log.warning("fedsparse cache: could not write %s (%s)", entry, err)


def cached(entry: str, compute: Callable[[], Arrays], valid: Callable[[Arrays], bool]) -> Arrays:
    """`compute()`, or the stored result when one exists and passes `valid` (else recompute)."""
    arrays = load(entry)
    if arrays is not None:
        try:
            if valid(arrays):
                return arrays
        except Exception:  # a malformed entry counts as invalid
            pass
        log.warning("fedsparse cache: %s failed validation, recomputing", entry)
    arrays = compute()
    save(entry, arrays)
    return arrays


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: a data owner may edit a file in place."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


Encoding = tuple[dict[str, list[list[int]]], np.ndarray]  # what `fedsparse.training.train.encode` returns


def cached_encoding(entry: str | None, compute: Callable[[], Encoding]) -> Encoding:
    """A tokenised shard (per-example token rows and labels); `entry` None: not cached."""
    if entry is None or cache_dir() is None:
        return compute()

    def arrays() -> Arrays:
        encoded, labels = compute()
        out = {"labels": np.asarray(labels)}
        for name, rows in encoded.items():
            out[f"{name}.offsets"] = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
            out[f"{name}.values"] = np.fromiter(
                (v for r in rows for v in r), np.int64, int(out[f"{name}.offsets"][-1])
            )
        return out

    def fields(stored: Arrays) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in stored if k != "labels"})

    def valid(stored: Arrays) -> bool:
        n = len(stored["labels"])
        return "input_ids" in fields(stored) and all(
            stored[f"{k}.offsets"].shape == (n + 1,)
            and stored[f"{k}.offsets"][0] == 0
            and stored[f"{k}.offsets"][-1] == len(stored[f"{k}.values"])
            and bool(np.all(np.diff(stored[f"{k}.offsets"]) >= 0))
            for k in fields(stored)
        )

    stored = cached(entry, arrays, valid)
    encoded = {}
    for k in fields(stored):
        flat, bounds = stored[f"{k}.values"].tolist(), stored[f"{k}.offsets"].tolist()
        encoded[k] = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return encoded, stored["labels"]
