"""Local training step time per method on MiniLM (batch 16 of SST-2, 1 thread, as one simulated
client gets), and PaFi's masked backward against autograd through the dense weights.

    python experiments/step_time.py     # writes experiments/results/step_time.md
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import write_result

from fedsparse.data.glue import train_split
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model, load_tokenizer
from fedsparse.run import compose_config
from fedsparse.training.train import make_loader, train

VARIANTS = [
    ("pafi (masked backward, SDDMM)", ["method=pafi"]),
    ("pafi (masked backward, gather)", ["method=pafi", "method.masked_backward=gather"]),
    ("pafi (dense autograd)", ["method=pafi", "method.masked_backward=dense"]),
    ("hiwi", ["method=hiwi"]),
    ("bitfit", ["method=bitfit"]),
    ("lora", ["method=lora"]),
    ("topk", ["method=topk"]),
    ("full", ["method=full"]),
]
STEPS, REPEATS = 10, 3


def seconds_per_step(overrides: list[str], loader) -> float:
    """On the CPU whatever train.device says (its table is a 1-thread CPU measurement; a GPU's
    is experiments/gpu_check.py's)."""
    cfg = compose_config(overrides)
    method = build_method(load_model(cfg.model.name, 2, 0), cfg.method)
    train(method, loader, cfg.train.lr, steps=2)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        train(method, loader, cfg.train.lr, steps=STEPS)
        times.append((time.perf_counter() - start) / STEPS)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    cfg = compose_config([])
    loader = make_loader(train_split(cfg).select(range(1000)), load_tokenizer(cfg.model.name), 64, 16, True)
    rows = [(name, seconds_per_step(overrides, loader)) for name, overrides in VARIANTS]
    base = rows[0][1]
    lines = [
        f"MiniLM, SST-2 batch 16, 1 thread, best of {REPEATS} x {STEPS} steps",
        "",
        "| method | s per step | relative to pafi (SDDMM) |",
        "|---|---:|---:|",
    ] + [f"| {name} | {sec:.3f} | {sec / base:.2f} |" for name, sec in rows]
    write_result("\n".join(lines), Path(__file__).resolve().parent / "results" / "step_time.md")


if __name__ == "__main__":
    main()
