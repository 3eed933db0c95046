"""Long runs must not grow: resident memory of every process, every round, in a simulation and in a
loopback deployment of the tiny federation.

    python experiments/soak.py [--sim-rounds 200] [--deployed-rounds 50] [--part both|sim|deployed]

The simulation runs `python -m fedsparse +experiment=smoke` in a subprocess and samples, each
time rounds.jsonl gains a line, the resident memory of the driver (the ServerApp), the Ray
ClientApp actors and Ray's own daemons (raylet, GCS, ...). The deployment runs a real SuperLink,
two SuperNodes and `flwr run` on 127.0.0.1 (fedsparse.deploy.loopback) and samples the SuperLink,
each SuperNode and the ServerApp process the same way (ClientApp processes live one message each:
their peak is reported). Growth per 100 rounds is the least-squares slope of each series after
the first 10% of the rounds (start-up and caches filling), times 100. Writes
experiments/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
from common import write_result

from fedsparse.deploy.loopback import deploy, started_with

TINY = ["+experiment=smoke", "data.max_eval_examples=32", "save_model=false"]
MB = 2**20


def _role(proc: psutil.Process) -> str | None:
    """Which part of the federation a process is, from its command line."""
    cmd = " ".join(proc.cmdline())
    for role in ("flwr-clientapp", "flwr-serverapp", "flower-superlink", "flower-supernode"):
        if role in cmd:
            return role
    if "ClientAppActor" in cmd or "ClientAppActor" in proc.name():
        return "ray-actor"
    if "ray" in cmd:
        return "ray-daemon"
    return None


def _sample(processes: list[psutil.Process], root_role: str | None = None) -> dict[str, float]:
    """Resident MB per role (summed over the processes of a role); supernodes one by one."""
    rss: dict[str, float] = defaultdict(float)
    for proc in processes:
        try:
            role = root_role if root_role and proc is processes[0] else _role(proc)
            if role == "flower-supernode":
                role = f"supernode-{proc.pid}"
            if role:
                rss[role] += proc.memory_info().rss / MB
        except psutil.Error:
            continue
    return dict(rss)


def _watch(rounds_file: Path, sample, stop: threading.Event, per_round: list[dict]) -> None:
    """Append `sample()` each time rounds_file gains a line; track transient ClientApp peaks."""
    while not stop.is_set():
        lines = rounds_file.read_bytes().count(b"\n") if rounds_file.exists() else 0
        now = sample()
        if per_round:
            per_round[-1]["clientapp_peak"] = max(
                per_round[-1].get("clientapp_peak", 0.0), now.get("flwr-clientapp", 0.0)
            )
        while len(per_round) < lines:
            per_round.append({"round": len(per_round), **now})
        time.sleep(0.2)


def growth_per_100(per_round: list[dict], key: str) -> float | None:
    """MB per 100 rounds: least-squares slope after the first 10% of the rounds."""
    points = [(r["round"], r[key]) for r in per_round if key in r]
    points = points[max(1, len(points) // 10) :]
    if len(points) < 3:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0] * 100)


def soak_simulation(rounds: int, work: Path) -> dict:
    out = work / "sim"
    argv = [sys.executable, "-m", "fedsparse", *TINY, f"federation.rounds={rounds}"]
    argv += [f"output_dir={out}", "run_name=soak"]
    began = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)

    def sample() -> dict[str, float]:
        try:
            return _sample([root, *root.children(recursive=True)], root_role="server")
        except psutil.Error:
            return {}

    per_round, stop = [], threading.Event()
    watcher = threading.Thread(target=_watch, args=(out / "soak" / "rounds.jsonl", sample, stop, per_round))
    watcher.start()
    code = proc.wait()
    stop.set()
    watcher.join()
    return {
        "exit": code,
        "rounds": len(per_round) - 1,
        "seconds": time.time() - began,
        "per_round": per_round,
    }


def soak_deployment(rounds: int, work: Path) -> dict:
    home = work / "flwr-home"

    def sample() -> dict[str, float]:
        return _sample(started_with(home))

    per_round, stop = [], threading.Event()
    rounds_file = work / "results" / "deployed" / "rounds.jsonl"
    watcher = threading.Thread(target=_watch, args=(rounds_file, sample, stop, per_round))
    watcher.start()
    began = time.time()
    settings = [
        *TINY,
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        f"federation.rounds={rounds}",
    ]
    try:
        done = deploy(work, settings, timeout=60 * rounds + 300)
    finally:
        stop.set()
        watcher.join()
    return {
        "exit": done.run.returncode,
        "rounds": len(per_round) - 1,
        "seconds": time.time() - began,
        "per_round": per_round,
    }


def summarise(name: str, result: dict) -> list[str]:
    per_round = result["per_round"]
    # ClientApp processes live one message each: their per-round peak stands for them
    keys = sorted(
        {k for r in per_round for k in r if any(r.get(k) for r in per_round)} - {"round", "flwr-clientapp"}
    )
    lines = [
        f"## {name}: {result['rounds']} rounds in {result['seconds'] / 60:.1f} min (exit {result['exit']})",
        "",
        "| process | MB after round 1 | MB at the end | peak MB | growth MB / 100 rounds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key in keys:
        series = [r[key] for r in per_round if key in r]
        growth = growth_per_100(per_round, key)
        first = next((r[key] for r in per_round[1:] if key in r), float("nan"))
        lines.append(
            f"| {key} | {first:.0f} | {series[-1]:.0f} | {max(series):.0f} | "
            + ("-" if growth is None else f"{growth:+.1f}")
            + " |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sim-rounds", type=int, default=200)
    parser.add_argument("--deployed-rounds", type=int, default=50)
    parser.add_argument("--part", choices=("both", "sim", "deployed"), default="both")
    parser.add_argument("--out", default="experiments/results/soak")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("both", "sim"):
            results["simulation"] = soak_simulation(args.sim_rounds, Path(tmp) / "sim")
        if args.part in ("both", "deployed"):
            results["deployment"] = soak_deployment(args.deployed_rounds, Path(tmp) / "deployed")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = [
        "# Soak: resident memory per round (experiments/soak.py)",
        "",
        "Tiny model (`+experiment=smoke`), 2-core machine shared with other runs; growth is the "
        "least-squares slope after the first 10% of the rounds, per 100 rounds.",
        "",
    ]
    for name, result in results.items():
        text += summarise(name, result)
    write_result("\n".join(text), out.with_suffix(".md"))


if __name__ == "__main__":
    main()
