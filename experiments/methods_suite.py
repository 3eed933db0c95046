"""Experiment (a): methods on SST-2, Dirichlet(1.0), the demo federation, several seeds, with
the same learning-rate rule (or search) for every method.

Each method's learning rate is its central one (fine-tuning on the pooled data) times a factor.
With one factor (default 4: what federated PaFi needed over central PaFi) every seed runs at that
rate. With several (`--factors 1 4`), seed 0 runs at each and the other seeds at the one with the
better final dev metric: the same search budget for every method. Every run goes through
`python -m fedsparse +experiment=methods`, which names runs by their configuration and skips
finished ones, so rerunning this script continues an interrupted suite. Seeds run one after
another (all methods of seed 0 first), so a suite cut short still compares every method.

    python experiments/methods_suite.py                        # pafi, full, lora, bitfit; seeds 0 1 2
    python experiments/methods_suite.py --methods hiwi topk    # more methods, same rule
    python experiments/methods_suite.py --factors 1 4          # a two-point search per method
    python -m fedsparse.report --readme docs/results.md        # tables and plots from the results
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

RESULTS = Path(__file__).resolve().parent / "results" / "methods"
CENTRAL_LR = {"pafi": 5e-3, "full": 5e-5, "lora": 1e-3, "bitfit": 1e-3, "hiwi": 3e-3, "topk": 5e-5}


def run(method: str, lr: float, seed: int, extra: list[str]) -> None:
    overrides = [f"method={method}", f"train.lr={lr:g}", f"seed={seed}", *extra]
    print(f"== {' '.join(overrides)}", flush=True)
    subprocess.run([sys.executable, "-m", "fedsparse", "+experiment=methods", *overrides], check=True)


def final_metric(method: str, lr: float, seed: int) -> float | None:
    """The final dev metric of the finished run with these settings, if there is one."""
    for summary in RESULTS.glob("*/summary.json"):
        cfg = OmegaConf.load(summary.parent / "config.yaml")
        if cfg.method.name == method and cfg.seed == seed and math.isclose(cfg.train.lr, lr):
            result = json.loads(summary.read_text())
            return result["final"][result["metric"]]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["pafi", "full", "lora", "bitfit"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--factors", nargs="+", type=float, default=[4.0], help="x the central lr")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = parser.parse_args()
    chosen = {}
    for method in args.methods:
        candidates = [CENTRAL_LR[method] * f for f in args.factors]
        if len(candidates) > 1:
            for lr in candidates:
                run(method, lr, args.seeds[0], args.extra)
        chosen[method] = max(candidates, key=lambda lr: final_metric(method, lr, args.seeds[0]) or 0.0)
        print(f"== {method}: lr {chosen[method]:g}", flush=True)
    for seed in args.seeds:
        for method in args.methods:
            run(method, chosen[method], seed, args.extra)


if __name__ == "__main__":
    main()
