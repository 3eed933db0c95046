"""Simulation cost as the federation grows: peak memory and wall time per round.

    python experiments/memory_scaling.py [--clients 10 100 1000] [--model minilm]

Each size runs `python -m fedsparse` in a subprocess (10 clients sampled per round, IID shards
of SST-2) while this script samples the resident memory of the whole process tree (driver,
Ray workers, raylet) every 0.2 s. Idle clients must cost nothing: Flower's simulation keeps one
ClientApp process per actor and fedsparse caches one model per process, so the peak should
stay flat from 10 to 1000 clients. Writes experiments/results/memory_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(num_clients: int, model: str, rounds: int, out_dir: Path) -> dict:
    overrides = [
        f"model.name={model}",
        f"federation.num_clients={num_clients}",
        "federation.clients_per_round=10",
        f"federation.rounds={rounds}",
        "federation.partitioner=iid",
        "train.local_steps=5",
        "data.max_eval_examples=128",
        f"output_dir={out_dir}",
        f"run_name=clients-{num_clients}",
    ]
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fedsparse", *overrides])
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"run with {num_clients} clients failed (exit {proc.returncode})")
    rounds_log = [
        json.loads(line)
        for line in (out_dir / f"clients-{num_clients}" / "rounds.jsonl").read_text().splitlines()
    ]
    per_round = [b["wall_seconds"] - a["wall_seconds"] for a, b in zip(rounds_log, rounds_log[1:])]
    return {
        "clients": num_clients,
        "sampled_per_round": 10,
        "peak_rss_mb": round(peak / 2**20),
        "mean_round_seconds": round(sum(per_round) / len(per_round), 2),
        "total_seconds": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="experiments/results/memory_scaling")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_one(n, args.model, args.rounds, Path(tmp)) for n in args.clients]
    lines = [
        f"Model {args.model}, 10 clients sampled per round, {args.rounds} rounds, 5 local steps",
        "",
        "| clients | peak RSS of all processes (MB) | mean wall time per round (s) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['clients']} | {r['peak_rss_mb']:,} | {r['mean_round_seconds']} |" for r in results]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
