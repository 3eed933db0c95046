"""Checkpoints: after every round, everything a run needs to continue bit-identically.

One file, `<run dir>/checkpoint.npz`, holds the global packed vector, the server optimiser's
state (FedAvgM momentum, FedAdam moments), the round, the results so far and the state of the
run's secret generators (central DP noise). It is written to a temporary file, flushed to disk
and renamed over the previous one, so a run killed at any moment leaves either the previous
round's checkpoint or this one, never half of one.

Every other random draw is a function of the public seed: client sampling draws from a
generator keyed by (seed, round), and each client reseeds its data order, dropout and SecAgg+
rounding from (seed, round, partition) every round, so a resumed run draws exactly what the
uninterrupted run would have. Because of the DP noise state, a checkpoint is a secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsparse.atomic import write_atomic

FILE = "checkpoint.npz"
STATE_PREFIX = "state."
SCHEMA_VERSION = 2  # 1: saved before versions existed (no generators)


@dataclass
class Checkpoint:
    round: int  # the last completed round (0: only the initial state was evaluated)
    values: np.ndarray
    history: list[dict]  # the rounds.jsonl records so far, round 0 included
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    generators: dict[str, dict] = field(default_factory=dict)  # name -> numpy bit-generator state


def save(run_dir: Path, checkpoint: Checkpoint) -> Path:
    path = Path(run_dir) / FILE
    meta = {
        "schema_version": SCHEMA_VERSION,
        "round": checkpoint.round,
        "history": checkpoint.history,
        "generators": checkpoint.generators,
    }
    meta = json.dumps(meta).encode()
    arrays = {f"{STATE_PREFIX}{k}": v for k, v in checkpoint.strategy_state.items()}
    return write_atomic(
        path, lambda f: np.savez(f, values=checkpoint.values, meta=np.frombuffer(meta, np.uint8), **arrays)
    )


def load(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: resume=<dir> needs the directory of a run that completed at "
            "least its initial evaluation (it writes a checkpoint after every round)."
        )
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes())
        state = {k.removeprefix(STATE_PREFIX): data[k] for k in data.files if k.startswith(STATE_PREFIX)}
        return Checkpoint(meta["round"], data["values"], meta["history"], state, meta.get("generators", {}))
