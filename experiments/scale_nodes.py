"""A 20-node loopback deployment while about 30% of the nodes are killed and restarted.

    python experiments/scale_nodes.py [--nodes 20] [--per-round 10] [--rounds 3] [--restart 0.3]

A real SuperLink, `--nodes` SuperNodes (one partition each) and `flwr run` on 127.0.0.1
(fedsparse.deploy.loopback), the tiny model, `--per-round` nodes sampled per round. Once round 1
is recorded, `--restart` of the nodes (drawn with a fixed seed) are killed (SIGKILL) one after
another, a few seconds apart, and each is started again at once with the same --node-config.
Reports the rounds completed, who was left out of each round and why, and the resident memory
and CPU time of the SuperLink, the ServerApp and every SuperNode (ClientApp processes live one
message each: their peak count and memory are reported). Writes
experiments/results/scale_nodes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from common import write_result

from fedsparse.deploy.loopback import (
    flower_env,
    flwr_run,
    free_port,
    processes,
    started_with,
    superlink_argv,
    supernode_argv,
    wait_for_port,
    write_connection,
)
from fedsparse.report.results import read_run

MB = 2**20


def _usage(home: Path) -> dict[str, dict]:
    """Resident MB and CPU seconds of every process started with this FLWR_HOME, by kind."""
    usage: dict[str, dict] = {}
    for proc in started_with(home):
        try:
            cmd = " ".join(proc.cmdline())
            kind = next(
                (
                    k
                    for k in ("flwr-clientapp", "flwr-serverapp", "flower-superlink", "flower-supernode")
                    if k in cmd
                ),
                None,
            )
            if kind is None:
                continue
            cpu = proc.cpu_times()
            entry = usage.setdefault(kind, {"count": 0, "rss_mb": [], "cpu_s": []})
            entry["count"] += 1
            entry["rss_mb"].append(proc.memory_info().rss / MB)
            entry["cpu_s"].append(cpu.user + cpu.system)
        except (psutil.Error, OSError):
            continue
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--restart", type=float, default=0.3, help="fraction of nodes killed and restarted")
    parser.add_argument("--out", default="experiments/results/scale_nodes")
    args = parser.parse_args()
    settings = [
        "+experiment=smoke",
        "data.max_eval_examples=32",
        "save_model=false",
        f"federation.num_clients={args.nodes}",
        f"federation.clients_per_round={args.per_round}",
        f"federation.rounds={args.rounds}",
        f"data.max_train_examples={40 * args.nodes}",
        "federation.wait_timeout=600",
    ]
    victims = sorted(random.Random(0).sample(range(args.nodes), round(args.restart * args.nodes)))
    peaks: dict[str, dict] = {}
    restarts: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home, port, out = work / "flwr-home", free_port(), work / "results"
        write_connection(home, "loopback", port)
        env = flower_env(home)
        began = time.monotonic()
        with processes(work, home) as start, ThreadPoolExecutor(1) as pool:
            link = start("superlink", superlink_argv(port, work / "state.db"), env)
            wait_for_port(port, link)
            nodes = {
                p: start(f"supernode-{p}", supernode_argv(port, p, args.nodes), env)
                for p in range(args.nodes)
            }
            run = pool.submit(
                flwr_run,
                "loopback",
                " ".join([*settings, f"output_dir={out}", "run_name=scale"]),
                env,
                timeout=3600,
            )
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    for kind, entry in _usage(home).items():
                        peak = peaks.setdefault(kind, {"count": 0, "rss_mb": 0.0, "rss_mb_total": 0.0})
                        peak["count"] = max(peak["count"], entry["count"])
                        peak["rss_mb"] = max(peak["rss_mb"], *entry["rss_mb"])
                        peak["rss_mb_total"] = max(peak["rss_mb_total"], sum(entry["rss_mb"]))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample)
            sampler.start()
            rounds_file = out / "scale" / "rounds.jsonl"
            while (not rounds_file.exists() or rounds_file.read_text().count("\n") < 2) and not run.done():
                time.sleep(0.5)
            for p in victims:
                if run.done():
                    break
                nodes[p].kill()
                nodes[p].wait()
                restarts.append({"partition": p, "at_s": round(time.monotonic() - began, 1)})
                nodes[p] = start(f"supernode-{p}-restarted", supernode_argv(port, p, args.nodes), env)
                time.sleep(3)
            result = run.result()
            final = _usage(home)
            stop.set()
            sampler.join()
        seconds = time.monotonic() - began
        _, rounds, summary = read_run(out / "scale")
    record = {
        "nodes": args.nodes,
        "per_round": args.per_round,
        "restarted_partitions": victims,
        "restarts": restarts,
        "flwr_run_exit": result.returncode,
        "rounds_completed": summary.get("rounds_done"),
        "finished": summary.get("finished"),
        "seconds": round(seconds, 1),
        "rounds": [
            {
                k: r[k]
                for k in ("round", "sampled", "rejected", "skipped", "node_notes", "wall_seconds")
                if k in r
            }
            | {"replies": r["comm"]["up"]["messages"]}
            for r in rounds
        ],
        "peak": peaks,
        "at_end": {
            k: {"count": v["count"], "rss_mb": sum(v["rss_mb"]), "cpu_s": sum(v["cpu_s"])}
            for k, v in final.items()
        },
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# 20 SuperNodes on loopback, 30% killed and restarted (experiments/scale_nodes.py)",
        "",
        f"{args.nodes} SuperNodes, {args.per_round} sampled per round, {args.rounds} rounds, tiny model; "
        f"partitions {victims} killed (SIGKILL) and restarted after round 1, 3 s apart. "
        f"`flwr run` exit {result.returncode}; {summary.get('rounds_done')} rounds completed, "
        f"finished {summary.get('finished')}; {seconds / 60:.1f} min on the 2-core machine.",
        "",
        "| round | replies | left out | node notes | wall s |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in record["rounds"][1:]:
        lines.append(
            f"| {r['round']} | {r['replies']} | {len(r['rejected'])} | {len(r['node_notes'])} | {r['wall_seconds']:.0f} |"
        )
    lines += ["", "| process | peak count | peak MB (one) | peak MB (all) | CPU s at the end (all) |"]
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    for kind, peak in sorted(peaks.items()):
        cpu = record["at_end"].get(kind, {}).get("cpu_s")
        lines.append(
            f"| {kind} | {peak['count']} | {peak['rss_mb']:.0f} | {peak['rss_mb_total']:.0f} | "
            + ("-" if cpu is None else f"{cpu:.0f}")
            + " |"
        )
    write_result("\n".join(lines), out_path.with_suffix(".md"))


if __name__ == "__main__":
    main()
