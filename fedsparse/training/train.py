"""Tokenisation, local training and evaluation shared by central and federated runs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsparse.methods import Method
from fedsparse.methods.device import autocast, model_device, seeded
from fedsparse.training.metrics import compute_metrics

if TYPE_CHECKING:
    import datasets


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of similar-length examples, in random order (Hugging Face's `group_by_length`).

    Padding every batch to its longest example triples the tokens computed on SST-2 (mean 13
    tokens, padded batch of 16: 36). Each chunk of `batch_size * chunk_batches` shuffled
    examples is sorted by length and cut into batches, and the batches are shuffled, so batch
    contents stay random while their lengths match. Without shuffling: sorted, for evaluation.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, generator: torch.Generator | None, chunk_batches: int = 50
    ):
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.chunk = batch_size * chunk_batches

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if self.generator is None:
            order = sorted(range(n), key=self.lengths.__getitem__)
            yield from (order[i : i + self.batch_size] for i in range(0, n, self.batch_size))
            return
        perm = torch.randperm(n, generator=self.generator).tolist()
        batches = []
        for start in range(0, n, self.chunk):
            chunk = sorted(perm[start : start + self.chunk], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


LEGACY_PARTITIONS = 1_009  # below this, client seeds keep the formula the committed results used


def client_seed(seed: int, server_round: int, partition: int) -> int:
    """The seed of one client's local training in one round (data order, dropout).

    Below 1,009 partitions it is the formula the committed results were computed with,
    `seed * 1_000_003 + round * 1_009 + partition`, which is unique there; from partition 1,009
    on that formula would give two clients one seed (partition p + 1,009 in round r is p in round
    r + 1), so larger federations draw it from a `SeedSequence` over (seed, round, partition)."""
    if 0 <= partition < LEGACY_PARTITIONS:
        return seed * 1_000_003 + server_round * LEGACY_PARTITIONS + partition
    state = np.random.SeedSequence([seed, server_round, partition]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # 63 bits: any torch or numpy seed accepts it


def make_loader(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    """Tokenise once; batches of similar lengths, padded per batch."""
    return encoded_loader(*encode(dataset, tokenizer, max_length), tokenizer, batch_size, shuffle, seed)


def encode(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[dict[str, list[list[int]]], np.ndarray]:
    """Token ids (and the tokenizer's other per-token fields) per example, and the labels:
    the expensive part of a loader, which a deployment ClientApp keeps in its disk cache."""
    texts = [list(dataset["sentence1"])]
    if "sentence2" in dataset.column_names:
        texts.append(list(dataset["sentence2"]))
    return dict(tokenizer(*texts, truncation=True, max_length=max_length)), np.asarray(dataset["label"])


def encoded_loader(
    encoded: dict[str, list[list[int]]],
    labels: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    """A loader over already tokenised examples (see `make_loader`)."""
    rows = [({k: v[i] for k, v in encoded.items()}, labels[i]) for i in range(len(labels))]

    def collate(batch):
        features = tokenizer.pad([f for f, _ in batch], return_tensors="pt")
        target = torch.as_tensor(np.array([y for _, y in batch]))
        features["labels"] = target.float() if target.is_floating_point() else target.long()
        return features

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    lengths = [len(ids) for ids in encoded["input_ids"]]
    batches = LengthGroupedBatches(lengths, batch_size, generator)
    return DataLoader(rows, batch_sampler=batches, collate_fn=collate, generator=generator)


def _batches(loader: DataLoader, steps: int) -> Iterator[dict]:
    """Cycle through the loader for exactly `steps` batches (small shards wrap around)."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train(
    method: Method,
    loader: DataLoader,
    lr: float,
    steps: int | None = None,
    epochs: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    description: str = "train",
    proximal_mu: float = 0.0,
    head_lr_scale: float = 1.0,
    precision: str = "fp32",
) -> float:
    """Run local optimisation on the method's trainable tensors only; returns the mean loss.

    The optimizer sees `method.parameters()`, so Adam state exists only for what is trained
    (the PaFi value vector, adapter factors, ...), never for whole frozen tensors. Batch order
    and dropout depend only on `seed`, so a client computes the same update whether it runs in
    a long-lived simulation actor or a fresh deployment process.

    `proximal_mu` > 0 is FedProx (Li et al. 2020): the local objective gets mu/2 ||w - w_global||^2
    over the trainable tensors, w_global being their values when training starts (the received
    global state). The returned loss is the data loss alone, comparable across strategies.
    `head_lr_scale` multiplies the lr of the classification head, the one freshly initialised
    layer, which may want another rate than the pre-trained values around it.

    Training runs where the method's model is (`Method.to`, `train.device`): each batch moves
    there, and `precision="bf16"` runs the forward under bfloat16 autocast (the trained tensors
    and the optimiser state stay float32). Dropout draws from the device's generator, so the same
    seed gives another batch of dropout masks on a GPU than on the CPU.
    """
    if steps is None:
        steps = max(1, math.ceil((epochs or 1) * len(loader)))
    loader.generator.manual_seed(seed)
    with seeded(seed, model_device(method.model)):
        return _optimise(
            method,
            loader,
            lr,
            steps,
            weight_decay,
            progress,
            description,
            proximal_mu,
            head_lr_scale,
            precision,
        )


def _optimise(
    method: Method,
    loader: DataLoader,
    lr: float,
    steps: int,
    weight_decay: float,
    progress: bool,
    description: str,
    proximal_mu: float,
    head_lr_scale: float,
    precision: str,
) -> float:
    model = method.model
    device = model_device(model)
    params = list(method.parameters())
    groups: list = params
    if head_lr_scale != 1.0:
        head = {id(p) for p in method.head}
        groups = [
            {"params": [p for p in params if id(p) not in head]},
            {"params": [p for p in params if id(p) in head], "lr": lr * head_lr_scale},
        ]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    anchors = [p.detach().clone() for p in params] if proximal_mu else []
    model.train()
    total = 0.0
    bar = tqdm(_batches(loader, steps), total=steps, desc=description, disable=not progress, leave=False)
    for step, batch in enumerate(bar, 1):
        with autocast(device, precision):
            loss = model(**to_device(batch, device)).loss
        loss.backward()
        for param, anchor in zip(params, anchors):  # d/dw of mu/2 ||w - anchor||^2, no extra graph
            param.grad.add_(param.detach() - anchor, alpha=proximal_mu)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{total / step:.4f}")
    model.eval()
    return total / steps


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (the loader builds them on the host)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, loader: DataLoader, task: str, precision: str = "fp32"
) -> dict[str, float]:
    """GLUE metrics of `model` on `loader` plus the mean loss, computed where the model is."""
    model.eval()
    device = model_device(model)
    predictions, labels, losses = [], [], []
    for batch in loader:
        with autocast(device, precision):
            out = model(**to_device(batch, device))
        losses.append(out.loss.item() * len(batch["labels"]))
        logits = out.logits.float().cpu()
        predictions.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1))
        labels.append(batch["labels"])
    y_pred = torch.cat(predictions).numpy()
    y_true = torch.cat(labels).numpy()
    return {**compute_metrics(task, y_pred, y_true), "loss": float(sum(losses) / len(y_true))}
