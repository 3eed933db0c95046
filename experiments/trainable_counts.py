"""Trainable values per method on a model (default: the bundled MiniLM).

    python experiments/trainable_counts.py [--model minilm] [--out experiments/results/trainable_counts.md]

Counts come from building each method on the real model, not from formulas.
"""

from __future__ import annotations

import argparse

from common import write_result

from fedsparse.methods import METHODS, build_method
from fedsparse.methods.model import load_model
from fedsparse.run import compose_config

VARIANTS = [
    ("pafi", []),
    ("hiwi", []),
    ("hiwi", ["method.exchange=merged"]),
    ("full", []),
    ("bitfit", []),
    ("lora", []),
    ("topk", []),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm", help="minilm, tiny-bert, a hub id or a path")
    parser.add_argument("--out", default="experiments/results/trainable_counts.md")
    args = parser.parse_args()
    rows = []
    total = None
    for name, extra in VARIANTS:
        assert name in METHODS
        cfg = compose_config([f"method={name}", f"model.name={args.model}", *extra])
        model = load_model(cfg.model.name, num_labels=2, seed=0)
        total = sum(p.numel() for p in model.parameters())
        method = build_method(model, cfg.method)
        label = name + (f" ({extra[0].split('=')[1]})" if extra else "")
        rows.append((label, method.num_trainable(), method.num_values(), method.head_size))
    lines = [
        f"Model: {args.model} ({total:,} parameters, 2-label head)",
        "",
        "| method | trained locally | values per message | of which head | % of model |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {trained:,} | {sent:,} | {head:,} | {100 * sent / total:.3f}% |"
        for label, trained, sent, head in rows
    ]
    write_result("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
