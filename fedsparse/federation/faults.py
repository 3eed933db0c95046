"""Fault injection (`federation.fail_rate`, `federation.fail_mode`) for tests and experiments.

A sampled client fails with probability `fail_rate`, decided by (seed, round, partition) so
that the same clients fail in every repetition of a run: `error` raises (the server receives
an error reply), `timeout` sleeps past `federation.round_timeout` and then raises (the server
stops waiting and goes on without the reply).
"""

from __future__ import annotations

import random
import time

from omegaconf import DictConfig

FAIL_MODES = ("error", "timeout")


def maybe_fail(cfg: DictConfig, server_round: int, partition_id: int) -> None:
    fed = cfg.federation
    rate = float(fed.fail_rate)
    if rate <= 0 or random.Random(f"fault-{cfg.seed}-{server_round}-{partition_id}").random() >= rate:
        return
    if fed.fail_mode == "timeout":
        time.sleep(float(fed.round_timeout) + 1.0)
    raise RuntimeError(
        f"injected fault (federation.fail_rate={rate}, fail_mode={fed.fail_mode}): "
        f"partition {partition_id}, round {server_round}"
    )
