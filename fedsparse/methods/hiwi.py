"""HiWi (Liao et al. 2023): an adapter applied to FFN *parameters*, merged away after training.

p' = p + f(p W_down) W_up, with W_up zero-initialised so training starts at the checkpoint.
For a bias p is the vector; for a weight matrix the adapter maps every row. After `merge()`
only p' remains, so inference runs the original architecture at the original speed.

Two federated packings (`exchange`):
- `factors`: the adapter factors travel and are averaged (what the design names);
- `merged`: only p' - p travels (m floats per target), which averages exactly; each round the
  client rebuilds the adapter on top of the received p' (fresh W_up = 0, seeded W_down).

`train_down=false` keeps W_down at its seeded initialisation (only W_up and the head train). A
trained W_down starting from W_up = 0 gets a tiny gradient that Adam scales up to about lr per
entry and step, so h = f(p' W_down) grows by about lr * ||p'||_1 per step (0.43 -> 10.9 in one
20-step round on MiniLM) and each client's merged change is large (norm ~30) and unrelated to the
others'; `exchange=merged` repeats this every round and collapses to one class under federation.
With W_down fixed, the same on every client, all clients share h and averaging the merged changes
h W_up is exactly averaging W_up (docs/methods.md, HiWi: measurements, and what is still open).
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from fedsparse.methods.base import Method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}
# target name -> (FFN sub-module suffix, attribute)
TARGETS = {
    "ffn_bias1": [(".intermediate.dense", "bias")],
    "ffn_biases": [(".intermediate.dense", "bias"), (".output.dense", "bias")],
    "ffn_weights": [(".intermediate.dense", "weight"), (".output.dense", "weight")],
}
EXCHANGES = ("factors", "merged")


class WeightAdapter(nn.Module):
    """Parametrization p -> p + f(p W_down) W_up (applied row-wise to matrices)."""

    def __init__(self, dim: int, rank: int, activation: str, generator: torch.Generator):
        super().__init__()
        self.down = nn.Parameter(torch.empty(dim, rank))
        self.up = nn.Parameter(torch.zeros(rank, dim))
        self.act = ACTIVATIONS[activation]()
        self.reset(generator)

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        self.down.copy_(torch.randn(self.down.shape, generator=generator) / self.down.shape[0] ** 0.5)
        self.up.zero_()

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p + self.act(p @ self.down) @ self.up


def ffn_sites(model: PreTrainedModel, target: str) -> list[tuple[str, nn.Module, str]]:
    """(name, module, attribute) of every FFN parameter the adapter applies to."""
    if target not in TARGETS:
        raise ValueError(f"hiwi.target={target} is unknown: choose one of {', '.join(TARGETS)}.")
    sites = []
    for name, module in model.named_modules():
        for suffix, attr in TARGETS[target]:
            if name.endswith(suffix) and ".attention." not in name and ".layer." in name:
                sites.append((f"{name}.{attr}", module, attr))
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no BERT-style FFN modules (*.intermediate.dense, "
            "*.output.dense) for HiWi: use another method or model."
        )
    return sites


class HiWi(Method):
    name = "hiwi"

    def __init__(self, model: PreTrainedModel, cfg: DictConfig):
        super().__init__(model, cfg)
        if cfg.exchange not in EXCHANGES or cfg.activation not in ACTIVATIONS:
            raise ValueError(
                f"hiwi.exchange must be one of {EXCHANGES} and hiwi.activation one of "
                f"{tuple(ACTIVATIONS)}; got {cfg.exchange}, {cfg.activation}."
            )
        if cfg.rank < 1:  # rank 0 would silently train only the head
            raise ValueError(f"hiwi.rank={cfg.rank}: use a rank >= 1 (default 8).")
        self.sites = ffn_sites(model, cfg.target)
        self.adapters: list[WeightAdapter] = []
        # the pre-trained parameters, kept to express the merged state as a delta
        self.pretrained = [getattr(m, a).detach().clone() for _, m, a in self.sites]
        generator = self._generator()  # one stream, as in `unpack`: layers get distinct W_down
        for _, module, attr in self.sites:
            dim = getattr(module, attr).shape[-1]
            adapter = WeightAdapter(dim, cfg.rank, cfg.activation, generator)
            parametrize.register_parametrization(module, attr, adapter)
            self.adapters.append(adapter)

    def to(self, device: torch.device | str) -> HiWi:
        super().to(device)
        self.pretrained = [p0.to(device) for p0 in self.pretrained]
        return self

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.cfg.seed))

    def _originals(self) -> list[nn.Parameter]:
        return [m.parametrizations[a].original for _, m, a in self.sites]

    def parameters(self) -> list[nn.Parameter]:
        if not self.cfg.get("train_down", True):  # W_down stays the seeded random map
            return [a.up for a in self.adapters] + self.head
        return [p for a in self.adapters for p in (a.down, a.up)] + self.head

    def state_tensors(self) -> list[torch.Tensor]:
        if self.cfg.exchange == "factors":
            return self.parameters()
        return self._originals() + self.head  # shapes of the merged deltas

    @torch.no_grad()
    def pack(self) -> np.ndarray:
        if self.cfg.exchange == "factors":
            return super().pack()
        deltas = [getattr(m, a) - p0 for (_, m, a), p0 in zip(self.sites, self.pretrained)]
        return torch.cat([t.reshape(-1).cpu() for t in deltas + [h.detach() for h in self.head]]).numpy()

    @torch.no_grad()
    def unpack(self, vector: np.ndarray) -> None:
        super().unpack(vector)  # factors, or the deltas written into the originals
        if self.cfg.exchange == "merged":
            generator = self._generator()
            for original, p0, adapter in zip(self._originals(), self.pretrained, self.adapters):
                original.add_(p0)  # original = p0 + received delta
                adapter.reset(generator)

    def merge(self) -> PreTrainedModel:
        return self._fold((module, attr) for _, module, attr in self.sites)
