"""Is HiWi's merged exchange sound without federation? One client on pooled (IID) SST-2 data,
8 "rounds" of 10 local steps; at each round boundary the state is packed and unpacked as a
client would receive it, so `exchange=merged` rebuilds the adapter (W_up = 0) on p' every round
while `exchange=factors` keeps it. Dev accuracy (first 256 dev examples) and the largest bias
change max|p' - p| after each round. About 5 min on 2 cores.

    python experiments/hiwi_exchange_pooled.py [--lr 3e-3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import write_result

from fedsparse.data.glue import dev_split, train_split
from fedsparse.methods import build_method
from fedsparse.methods.device import resolve_device
from fedsparse.methods.model import load_model, load_tokenizer
from fedsparse.run import compose_config
from fedsparse.training.train import evaluate, make_loader, train


def rounds(exchange: str, lr: float, n_rounds: int = 8, steps: int = 10) -> list[str]:
    overrides = ["method=hiwi", f"method.exchange={exchange}", "data.max_train_examples=4000"]
    cfg = compose_config([*overrides, "data.max_eval_examples=256"])
    tokenizer = load_tokenizer(cfg.model.name)
    method = build_method(load_model(cfg.model.name, 2, 0), cfg.method).to(resolve_device(cfg.train.device))
    train_loader = make_loader(train_split(cfg), tokenizer, 64, 16, shuffle=True, seed=0)
    dev_loader = make_loader(dev_split(cfg), tokenizer, 64, 64, shuffle=False)
    lines = []
    for r in range(1, n_rounds + 1):
        loss = train(method, train_loader, lr, steps=steps, seed=r)
        method.unpack(method.pack())  # the round boundary, as a client sees it
        moved = max(
            (getattr(module, attr) - p0).abs().max().item()
            for (_, module, attr), p0 in zip(method.sites, method.pretrained)
        )
        acc = evaluate(method.model, dev_loader, "sst2")["accuracy"]
        lines.append(f"| {exchange} | {r} | {loss:.3f} | {acc:.3f} | {moved:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = [
        f"# HiWi exchange modes on pooled data (experiments/hiwi_exchange_pooled.py, lr {args.lr:g})",
        "",
        "One client, 4,000 SST-2 training examples, 8 rounds of 10 steps of batch 16, MiniLM.",
        "",
        "| exchange | round | train loss | dev accuracy (256) | max abs bias change |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = rounds("merged", args.lr) + rounds("factors", args.lr)
    write_result("\n".join(header + rows), Path(__file__).parent / "results" / "hiwi_exchange_pooled.md")


if __name__ == "__main__":
    main()
