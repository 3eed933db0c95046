"""Non-federated fine-tuning on the whole training split: the reference for federated results."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from fedsparse.data.glue import TASKS, dev_split, train_split
from fedsparse.methods import build_method
from fedsparse.methods.device import resolve_device
from fedsparse.methods.model import load_model, load_tokenizer
from fedsparse.report.results import RunWriter
from fedsparse.training.train import evaluate, make_loader, train


def run_central(cfg: DictConfig) -> dict:
    spec = TASKS[cfg.task.name]
    tokenizer = load_tokenizer(cfg.model.name)
    method = build_method(load_model(cfg.model.name, spec.num_labels, cfg.seed), cfg.method)
    method.to(resolve_device(cfg.train.get("device", "auto")))
    precision = str(cfg.train.get("precision", "fp32"))
    train_set = train_split(cfg)
    train_loader = make_loader(
        train_set, tokenizer, cfg.data.max_length, cfg.train.batch_size, shuffle=True, seed=cfg.seed
    )
    dev_loader = make_loader(
        dev_split(cfg), tokenizer, cfg.data.max_length, cfg.train.eval_batch_size, shuffle=False
    )
    writer = RunWriter(cfg)
    print(
        f"central {cfg.method.name} on {cfg.task.name}: {len(train_set)} train examples, "
        f"{method.num_trainable():,} trainable values -> {writer.dir}"
    )
    start = time.time()
    loss = train(
        method,
        train_loader,
        cfg.train.lr,
        steps=cfg.train.central_steps,
        epochs=cfg.train.central_epochs,
        weight_decay=cfg.train.weight_decay,
        seed=int(cfg.seed),
        progress=True,
        description=f"{cfg.method.name}/{cfg.task.name}",
        head_lr_scale=float(cfg.train.head_lr_scale),
        precision=precision,
    )
    train_seconds = time.time() - start
    metrics = evaluate(method.model, dev_loader, cfg.task.name, precision)
    summary = {
        "mode": "central",
        "method": cfg.method.name,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "train_loss": loss,
        "train_seconds": train_seconds,
        "trainable_values": method.num_trainable(),
        "dev": metrics,
    }
    writer.write_summary(summary)
    print(
        "dev: "
        + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        + f"  (train {train_seconds:.0f}s, results in {writer.dir})"
    )
    return summary
