"""A client's compressed uplink and its error-feedback residual, the node's own state between rounds.

The residual must survive what Flower's `context.state` does not: a killed and resumed run, and
a SuperNode that serves each message in a fresh process. It lives in the node-local cache
directory (`fedsparse.data.cache`), one file per (run, partition, round):

    <cache dir>/residuals/<run key>/p<partition>/r<round>.npy

The run key is a digest of the run's training settings and name that the server sends with every
train message (`run-key`), so two runs never share residuals and a resumed run finds its own.
Round r reads the newest file of a round before r; a resumed round r rewrites round r's file
(atomically), so a rerun reads exactly what the uninterrupted run read. After writing round r
the files of later rounds (an abandoned timeline) and all but the newest earlier one (which a
rerun of round r would read) are deleted.

A client cannot know whether the server accepted its reply: the residual keeps only what the
compression lost of the update it sent, so a dropped reply loses that update like any dropped
reply, and the residual carries on as if it had arrived.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fedsparse.atomic import write_atomic
from fedsparse.data import cache
from fedsparse.federation import compression
from fedsparse.methods import Method

RUN_KEY = "run-key"  # the train config's entry naming the run's residual store
HELD_KEY = "held"  # the train reply's info entry: hex digest of the global this client received


def _node_dir(kind: str, run_key: str, partition: int, root: Path | None, setting: str, what: str) -> Path:
    """`<cache dir>/<kind>/<run key>/p<partition>`: where a node keeps its state for one run."""
    root = root or cache.cache_dir()
    if root is None:
        raise RuntimeError(
            f"{setting} needs the node-local cache for {what}: unset FEDSPARSE_CACHE=off or set FEDSPARSE_CACHE_DIR"
        )
    return Path(root) / kind / str(run_key) / f"p{int(partition)}"


class ResidualStore:
    def __init__(self, run_key: str, partition: int, root: Path | None = None):
        self.dir = _node_dir(
            "residuals", run_key, partition, root, "compression.error_feedback", "its residual"
        )

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem[1:]) for p in self.dir.glob("r*.npy") if p.stem[1:].isdigit())

    def _path(self, server_round: int) -> Path:
        return self.dir / f"r{server_round:06d}.npy"

    def load(self, server_round: int) -> np.ndarray | None:
        """The residual this partition left in its last trained round before `server_round`."""
        earlier = [r for r in self._rounds() if r < server_round]
        return np.load(self._path(earlier[-1])) if earlier else None

    def save(self, server_round: int, residual: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(server_round)
        write_atomic(path, lambda f: np.save(f, residual.astype(np.float32, copy=False)))
        earlier = [r for r in self._rounds() if r < server_round]
        for r in self._rounds():
            if r > server_round or r in earlier[:-1]:
                self._path(r).unlink(missing_ok=True)


def uplink(
    cfg: DictConfig, method: Method, received: np.ndarray, config, partition: int
) -> dict[str, np.ndarray]:
    """The arrays of a train reply: the method's own encoding of the local state, or with
    `compression.enabled` the update (sent values minus the received ones, plus the residual
    under error feedback) quantised into one `compressed` array; top-k's indices stay as they are.

    Under error feedback the residual is the whole vector the server will not reconstruct:
    `local + residual - decode(what was sent)`; for top-k that includes the unsent entries
    (error-feedback top-k)."""
    local = method.pack()
    c = cfg.get("compression")
    if c is None or not c.enabled:
        return method.encode(local, reference=received)
    server_round = int(config["server-round"])
    if c.error_feedback and RUN_KEY not in config:
        raise RuntimeError(
            f"compression.error_feedback: the train config lacks '{RUN_KEY}' (a server without compression?)"
        )
    store = ResidualStore(str(config[RUN_KEY]), partition) if c.error_feedback else None
    residual = store.load(server_round) if store else None
    target = local if residual is None else local + residual
    wire = method.encode(target, reference=received)
    reference = method.wire_reference(wire, received)
    update = wire.pop("values") - reference
    rng = compression.rounding_rng(cfg.seed, server_round, partition)
    rounding = compression.rounding_at(c, int(c.bits))
    wire[compression.KEY] = compression.encode(update, int(c.bits), int(c.block), rng, rounding)
    if store:
        sent = reference + compression.decode(wire[compression.KEY], update.size)
        store.save(server_round, target - method.decode({**wire, "values": sent}, received))
    return wire


class GlobalStore:
    """The globals a node received under a compressed downlink, one file per global named by its
    digest (`compression.global_digest`), in the node-local cache:

        <cache dir>/globals/<run key>/p<partition>/<digest hex>.npy

    A loaded file is checked against its name, so a corrupted file is never trained on."""

    def __init__(self, run_key: str, partition: int, root: Path | None = None):
        self.dir = _node_dir(
            "globals", run_key, partition, root, "compression.downlink_bits", "the global it holds"
        )

    def load(self, digest: bytes) -> np.ndarray | None:
        path = self.dir / f"{digest.hex()}.npy"
        try:
            values = np.load(path)
        except (OSError, ValueError):
            return None
        return values if compression.global_digest(values) == digest else None

    def newest(self, count: int) -> set[bytes]:
        """The digests of the `count` most recently written globals."""
        files = (
            sorted(self.dir.glob("*.npy"), key=lambda p: p.stat().st_mtime_ns) if self.dir.is_dir() else []
        )
        return {bytes.fromhex(p.stem) for p in files[-count:]}

    def save(self, values: np.ndarray, keep: set[bytes]) -> None:
        """Store `values` and delete every other global but those in `keep` (the base it was
        rebuilt from: a rerun of this round after a kill sends the same delta against it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = compression.global_digest(values)
        path = self.dir / f"{digest.hex()}.npy"
        write_atomic(path, lambda f: np.save(f, values.astype(np.float32, copy=False)))
        names = {f"{d.hex()}.npy" for d in keep | {digest}}
        for other in self.dir.glob("*.npy"):
            if other.name not in names:
                other.unlink(missing_ok=True)


def downlink(cfg: DictConfig, method: Method, arrays: dict, config, partition: int) -> np.ndarray:
    """The global a train or evaluate message stands for. With `compression.downlink_bits` a message
    may name the global its delta applies to (`base`, a digest) instead of carrying `values`: the
    node rebuilds the new global from its stored one (or its own initial state) bit for bit, stores
    it and reports its digest (`HELD_KEY`); without a global of that digest it refuses loudly, and
    the server sends the full vector next time."""
    bits = compression.downlink_bits(cfg)
    if not bits:
        return method.decode(arrays)
    if RUN_KEY not in config:
        raise RuntimeError(f"compression.downlink_bits: the message's config lacks '{RUN_KEY}'")
    store = GlobalStore(str(config[RUN_KEY]), partition)
    if compression.BASE_KEY not in arrays:
        received = method.decode(arrays).astype(np.float32, copy=False)
        # keep the two newest globals too: the server may still send a delta against the one this
        # node last reported (e.g. after a client-side evaluation sent it the full vector)
        store.save(received, keep=store.newest(2))
        return received
    base = np.asarray(arrays[compression.BASE_KEY], np.uint8).tobytes()
    held = store.load(base)
    if held is None:
        initial = method.initial_state()
        held = initial if compression.global_digest(initial) == base else None
    if held is None:
        raise RuntimeError(
            f"compressed downlink: this node holds no global with digest {base.hex()} (missing or "
            "corrupted store); the server sends it the full vector next time"
        )
    received = held
    if compression.KEY in arrays:
        received = compression.apply_delta(held, arrays[compression.KEY], bits, int(cfg.compression.block))
    store.save(received, keep={base})
    return received
