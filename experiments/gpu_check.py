"""Every method on a GPU beside the CPU: step time and the largest gradient difference.

For a GPU session (not run in CI): per method, seconds per local training step (fedsparse's own
`train`, AdamW, batches moved to the device) on the GPU and on the CPU at two batch sizes, the
largest gradient difference GPU vs CPU on one fixed batch (eval mode: no dropout), whether the
packed vector and the fingerprint are the same bytes on both, and the step time under bf16
autocast. The model has MiniLM's shape (the bundled checkpoint's config.json when installed,
else its numbers) with random weights: no download, no data set.

Imports fedsparse.methods and fedsparse.training only (no Flower, Ray, Hydra or datasets: the
GPU machine has torch, transformers, peft, omegaconf):

    python experiments/gpu_check.py                      # cuda vs cpu, MiniLM shape, batch 16 and 64
    python experiments/gpu_check.py --device cpu --tiny  # a smoke test anywhere
    python experiments/gpu_check.py --out $OUT/gpu_check  # on a lent device machine (files come back)

Not yet run on a GPU: no timing or tolerance in this repository comes from it so far.

Writes experiments/results/gpu_check/<card>.md and .json (card, torch and CUDA versions).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from fedsparse.methods import build_method
from fedsparse.methods.device import autocast, precision_problem, resolve_device
from fedsparse.methods.model import bundled_minilm_path, tiny_bert_config
from fedsparse.training.train import to_device, train

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONF = ROOT / "fedsparse" / "conf" / "method"
VARIANTS = [
    ("pafi (sddmm)", "pafi", {"masked_backward": "sddmm"}),
    ("pafi (gather)", "pafi", {"masked_backward": "gather"}),
    ("pafi (dense)", "pafi", {"masked_backward": "dense"}),
    ("hiwi", "hiwi", {}),
    ("lora", "lora", {}),
    ("bitfit", "bitfit", {}),
    ("full", "full", {}),
    ("topk", "topk", {}),
]
# sentence-transformers/all-MiniLM-L6-v2, for a machine without the bundled package
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def model_config(tiny: bool) -> BertConfig:
    if tiny:
        return tiny_bert_config(2)
    try:
        config = BertConfig.from_pretrained(bundled_minilm_path())
    except (FileNotFoundError, OSError):
        config = BertConfig(**MINILM)
    config.num_labels = 2
    return config


def build(name: str, settings: dict, config: BertConfig, device: torch.device):
    """The method on a random model of `config` (seeded: the same weights in every call), built
    on the host and moved to `device`, as the apps do."""
    cfg = OmegaConf.merge(OmegaConf.load(METHOD_CONF / f"{name}.yaml"), settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).eval()
    return build_method(model, cfg).to(device)


def batches(config: BertConfig, batch_size: int, length: int, count: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(batch_size)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, config.vocab_size, (batch_size, length), generator=gen)
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def loader(data: list[dict]) -> DataLoader:
    """The batches as a loader `train` accepts (it reseeds the loader's generator)."""
    return DataLoader(data, batch_size=None, shuffle=True, generator=torch.Generator())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(method, data: list[dict], steps: int, repeats: int, precision: str) -> float:
    device = method.device
    train(method, loader(data), 1e-4, steps=2, precision=precision)  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        train(method, loader(data), 1e-4, steps=steps, precision=precision)
        sync(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def gradients(method, batch: dict) -> list[torch.Tensor]:
    """The trained tensors' gradients on one batch, without dropout, on the host."""
    for p in method.parameters():
        p.grad = None
    method.model.eval()
    with autocast(method.device, "fp32"):
        method.model(**to_device(batch, method.device)).loss.backward()
    return [p.grad.detach().float().cpu() for p in method.parameters()]


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max |a - b|, the same relative to max |a|)."""
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.abs().max()) for x in a) or 1.0
    return diff, diff / scale


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer test BERT, for a smoke test")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--length", type=int, default=64, help="tokens per example (data.max_length)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "gpu_check"))
    args = parser.parse_args()

    device, cpu = resolve_device(args.device), torch.device("cpu")
    config = model_config(args.tiny)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    rows = []
    for label, name, settings in VARIANTS:
        if wanted and label not in wanted and name not in wanted:
            continue
        host, dev = build(name, settings, config, cpu), build(name, settings, config, device)
        row = {
            "method": label,
            "same_packed_vector": bool(np.array_equal(host.pack(), dev.pack())),
            "same_fingerprint": host.fingerprint() == dev.fingerprint(),
            "packed_dtype": str(dev.pack().dtype),
        }
        fixed = batches(config, sizes[0], args.length, count=1)[0]
        row["grad_max_abs_diff"], row["grad_max_rel_diff"] = largest_difference(
            gradients(host, fixed), gradients(dev, fixed)
        )
        for size in sizes:
            data = batches(config, size, args.length)
            row[f"s_per_step_b{size}_{device.type}"] = step_seconds(
                dev, data, args.steps, args.repeats, "fp32"
            )
            if precision_problem("bf16", device) is None:  # a GPU without bfloat16 gets no bf16 column
                row[f"s_per_step_b{size}_{device.type}_bf16"] = step_seconds(
                    dev, data, args.steps, args.repeats, "bf16"
                )
            if device.type != "cpu":
                row[f"s_per_step_b{size}_cpu"] = step_seconds(host, data, args.steps, args.repeats, "fp32")
        rows.append(row)
        print(json.dumps(row), flush=True)

    info = {
        "device": str(device),
        "card": card(device),
        "cpu": card(cpu),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": "tiny-bert" if args.tiny else "MiniLM shape (random weights)",
        "length": args.length,
        "batch_sizes": sizes,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", info["card"]).strip("-").lower() + ("-tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    keys = [k for k in rows[0] if k != "method"] if rows else []
    lines = [
        f"{info['card']} beside {info['cpu']}; torch {info['torch']}, CUDA {info['cuda']}; {info['model']}, "
        f"{args.length} tokens, best of {args.repeats} x {args.steps} steps",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ] + [
        f"| {r['method']} | "
        + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        + " |"
        for r in rows
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    main()
