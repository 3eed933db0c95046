"""Per-client top-k sparse updates: the per-client-mask design that PaFi makes unnecessary.

Each client trains the candidate weights (PaFi's groups) densely and sends only its k
largest-magnitude changes with their indices, k equal to PaFi's budget at the same density.
Supports differ between clients, so the server reconstructs every reply on top of the global
state and averages over the union of supports (absent entries count as unchanged). The
downlink carries the global state's changed entries relative to the checkpoint, with indices.
Indices travel under the key `indices`, encoded by `method.index_encoding` (`index_codec`):
`int32` (4 bytes each) or a lossless uint8 code of the sorted set (`varint`, `rice`,
`expgolomb`, `bitmap`, or `auto`: the smallest of those per message), for a top-k baseline
whose index traffic is as small as an honest per-client support allows.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from fedsparse.methods.base import Method
from fedsparse.methods.index_codec import get_codec
from fedsparse.methods.pafi import candidate_parameters


class TopK(Method):
    name = "topk"
    wire_keys = ("values", "indices")

    def __init__(self, model: PreTrainedModel, cfg: DictConfig):
        super().__init__(model, cfg)
        self.body = [p for _, p in candidate_parameters(model, cfg.groups)]
        for p in self.body:
            p.requires_grad_(True)
        self.body_size = sum(p.numel() for p in self.body)
        self.k = round(cfg.density * self.body_size)
        if not 0 < self.k <= self.body_size:
            raise ValueError(f"topk.density={cfg.density} gives k={self.k}: use 0 < density <= 1.")
        self.codec = get_codec(cfg.get("index_encoding", "int32"))

    def state_tensors(self) -> list[torch.Tensor]:
        return self.body + self.head

    def num_values(self) -> int:
        return self.k + self.head_size

    def encode(self, vector: np.ndarray, reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Uplink (reference = the global state received): the k largest changes.
        Downlink (reference = None): every entry that differs from the checkpoint."""
        body = vector[: self.body_size]
        if reference is None:
            index = np.flatnonzero(body != self.initial_state()[: self.body_size])
        else:
            change = np.abs(body - reference[: self.body_size])
            index = np.sort(np.argpartition(change, -self.k)[-self.k :])
        values = np.concatenate([body[index], vector[self.body_size :]]).astype(np.float32)
        return {"values": values, "indices": self.codec.encode(index, self.body_size)}

    def _indices(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Decoded indices (sorted, unique, in range) that match the number of values."""
        index = self.codec.decode(arrays["indices"], self.body_size)
        values = arrays["values"]
        if values.size != index.size + self.head_size:
            raise ValueError(
                f"top-k payload has {values.size} values for {index.size} indices "
                f"+ {self.head_size} head entries."
            )
        return index

    def check_wire(self, arrays: dict[str, np.ndarray]) -> str | None:
        """Why an uplink reply's indices are unusable, or None: they must decode under this
        side's `index_encoding` to exactly k indices, with one value each plus the head."""
        try:
            index = self._indices(arrays)
        except ValueError as err:
            return str(err)
        if index.size != self.k:
            return f"top-k reply carries {index.size} indices, expected k={self.k}"
        return None

    def wire_reference(self, arrays: dict[str, np.ndarray], reference: np.ndarray) -> np.ndarray:
        """`reference` at the sent indices, then its head (indices checked like `decode`'s)."""
        index = self.codec.decode(arrays["indices"], self.body_size)
        return np.concatenate([reference[index], reference[self.body_size :]]).astype(np.float32)

    def decode(self, arrays: dict[str, np.ndarray], reference: np.ndarray | None = None) -> np.ndarray:
        """Scatter the sent entries onto `reference` (default: the checkpoint)."""
        index, values = self._indices(arrays), arrays["values"]
        out = (self.initial_state() if reference is None else reference).copy()
        out[index] = values[: index.size]
        out[self.body_size :] = values[index.size :]
        return out
