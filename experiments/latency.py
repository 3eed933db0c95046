"""Inference latency: merged PaFi/HiWi vs the base model vs unmerged LoRA and a hidden-state adapter.

    python experiments/latency.py [--model minilm] [--batch 32] [--length 64] [--repeats 30]

All variants run in one process on the same batch; each timing is the median of `repeats`
forward passes after warm-up. Merged PaFi/HiWi are stock models, so their ratio to the base
should be ~1.00; LoRA left unmerged and a Houlsby-style adapter on the hidden states add work.
Writes experiments/results/latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fedsparse.methods import build_method
from fedsparse.methods.model import load_model
from fedsparse.run import compose_config


class HiddenStateAdapter(nn.Module):
    """Houlsby et al. 2019 bottleneck on a layer's output: h + up(relu(down(h)))."""

    def __init__(self, dim: int, rank: int = 8):
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)

    def forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.up(torch.relu(self.down(output)))


def with_hidden_adapters(model: nn.Module) -> nn.Module:
    for layer in model.base_model.encoder.layer:
        adapter = HiddenStateAdapter(model.config.hidden_size)
        layer.output.add_module("adapter", adapter)
        layer.output.register_forward_hook(adapter)
    return model


@torch.no_grad()
def median_ms(model: nn.Module, batch: dict, repeats: int) -> float:
    model.eval()
    for _ in range(5):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def build(variant: str, model_name: str) -> nn.Module:
    model = load_model(model_name, num_labels=2)
    if variant == "base":
        return model
    if variant == "hidden-state adapter":
        return with_hidden_adapters(model)
    name, merge = variant.split()
    method = build_method(model, compose_config([f"method={name}", f"model.name={model_name}"]).method)
    return method.merge() if merge == "merged" else method.model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="experiments/results/latency")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    variants = [
        "base",
        "pafi merged",
        "hiwi merged",
        "lora merged",
        "lora unmerged",
        "pafi unmerged",
        "hiwi unmerged",
        "hidden-state adapter",
    ]
    results = {v: median_ms(build(v, args.model), batch, args.repeats) for v in variants}
    base = results["base"]
    lines = [
        f"Model {args.model}, batch {args.batch} x {args.length} tokens, CPU, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}",
        "",
        "| variant | ms per batch | ratio to base |",
        "|---|---:|---:|",
    ]
    lines += [f"| {v} | {ms:.1f} | {ms / base:.2f} |" for v, ms in results.items()]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "ms": results}, indent=2))
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
