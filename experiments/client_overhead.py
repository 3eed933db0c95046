"""Per-message overhead of a deployment ClientApp process, cold vs warm.

In deployment each message starts a fresh `flwr-clientapp` process, so all of this is paid per
message: the imports, loading the model and building the method (PaFi's mask), and reading,
partitioning and tokenising the node's shard. Each measurement runs in a fresh subprocess at
the demo settings (MiniLM, PaFi, SST-2 bundled, 10 partitions, 10 local steps of batch 16)
and times process start -> imports -> method -> shard (the first training step could start
here) -> 10 local steps (the training the overhead is compared with).

  .venv/bin/python experiments/client_overhead.py [--repeats 2] [--baseline-src DIR]

Variants: `before` (caches off; with --baseline-src, the sources of DIR, e.g. the commit
before the cache, so its eager imports too), `no-cache` (this tree, FEDSPARSE_CACHE=off),
`cold` (this tree, empty cache dir: a node's first message), `warm` (entries present).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

from fedsparse.deploy.loopback import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
start = float(sys.argv[1])
t = {"interpreter": time.time() - start}
import fedsparse.apps.client_app as ca
from fedsparse.run import compose_config
t["imports"] = time.time() - start - sum(t.values())
cfg = compose_config(())
method = ca.client_method(cfg)
t["method"] = time.time() - start - sum(t.values())
loader = ca.client_shard(cfg, {"partition-id": 0, "num-partitions": 10}, int(cfg.train.batch_size))
t["shard"] = time.time() - start - sum(t.values())
t["overhead"] = time.time() - start
cpu = time.process_time()
from fedsparse.training.train import train
train(method, loader, float(cfg.train.lr), steps=int(cfg.train.local_steps))
t["train"] = time.time() - start - t["overhead"]
t["overhead cpu"], t["train cpu"] = cpu, time.process_time() - cpu
print("RESULT", json.dumps(t))
"""


def measure(env: dict[str, str]) -> dict[str, float]:
    """One fresh process, as `flwr-clientapp` would start for one message."""
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(start)],
        env={**os.environ, **OFFLINE_ENV, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-src", help="import fedsparse from this directory for `before`")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/client_overhead.md"))
    args = parser.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="fedsparse-overhead-cache-")
    off = {"FEDSPARSE_CACHE": "off", "FEDSPARSE_CACHE_DIR": cache_dir}
    variants = {
        "before": {**off, **({"PYTHONPATH": args.baseline_src} if args.baseline_src else {})},
        "no-cache": off,
        "cold": {"FEDSPARSE_CACHE_DIR": cache_dir},
        "warm": {"FEDSPARSE_CACHE_DIR": cache_dir},
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, env in variants.items():
            if name == "cold":
                for entry in Path(cache_dir).glob("*.npz"):
                    entry.unlink()
            results[name].append(measure(env))
            print(name, {k: round(v, 2) for k, v in results[name][-1].items()}, flush=True)
    keys = ["interpreter", "imports", "method", "shard", "overhead", "train", "overhead cpu", "train cpu"]
    lines = [
        "# Per-message overhead of a ClientApp process (experiments/client_overhead.py)",
        "",
        "Fresh process per message, demo settings (MiniLM, PaFi d=0.005, bundled SST-2, 10 "
        "Dirichlet partitions, partition 0, 10 local steps of batch 16). Seconds, median of "
        f"{args.repeats} runs; overhead = process start to the first training step; "
        "cpu = the process's CPU seconds (all threads), less sensitive to other jobs than wall time.",
        f"Machine: {os.cpu_count()} CPU cores, load average at the end {os.getloadavg()[0]:.1f} "
        "(shared with other jobs: timings are noisy).",
        "",
        "| variant | " + " | ".join(keys) + " | overhead / train |",
        "|---|" + "---:|" * (len(keys) + 1),
    ]
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        cells = " | ".join(f"{med[k]:.2f}" for k in keys)
        lines.append(f"| {name} | {cells} | {med['overhead'] / med['train']:.2f} |")
    lines += [
        "",
        "before: caches off"
        + (
            f", sources of {args.baseline_src} (before the cache and lazy imports)"
            if args.baseline_src
            else ""
        )
        + "; no-cache: this tree, FEDSPARSE_CACHE=off; cold: empty cache (a node's first "
        "message, which writes the entries); warm: entries present (every later message).",
    ]
    write_result("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
