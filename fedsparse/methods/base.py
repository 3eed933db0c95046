"""The interface every fine-tuning method implements.

A method owns a model and exposes its trainable state as one flat float32 vector whose last
`head_size` entries are the task head. Clients and server exchange that vector (encoded by
`encode`/`decode`, identity except for top-k); nothing else of the model ever crosses the wire.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from fedsparse.methods.model import head_parameter_names


def checkpoint_digest(model: PreTrainedModel) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (the head included: it comes
    from the seed, so this also catches a seed mismatch)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        data = param.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(param.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy())  # the raw bytes, without a copy
    return digest.hexdigest()


class Method:
    name: ClassVar[str]
    wire_keys: ClassVar[tuple[str, ...]] = ("values",)  # arrays in every message
    # settings that need not agree between server and clients: the lr travels in each message
    local_settings: ClassVar[tuple[str, ...]] = ("lr",)

    def __init__(self, model: PreTrainedModel, cfg: DictConfig):
        self.model = model
        self.cfg = cfg
        self._checkpoint = checkpoint_digest(model)  # before the method or training changes a weight
        model.requires_grad_(False)
        named = dict(model.named_parameters())
        self.head = [named[n] for n in head_parameter_names(model)]
        for p in self.head:
            p.requires_grad_(True)

    # --- what subclasses define -------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors that make up the packed vector, in order; the head comes last."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """What the local optimizer updates (by default: the packed tensors themselves)."""
        return self.state_tensors()

    def merge(self) -> PreTrainedModel:
        """Return a stock Hugging Face model with the trained state folded in."""
        return self.model

    def _fold(self, sites: Iterable[tuple[nn.Module, str]]) -> PreTrainedModel:
        """Replace each parametrized (module, attribute) by its current value: a stock model."""
        for module, attr in sites:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        self.model.requires_grad_(True)
        return self.model

    def fingerprint(self) -> str:
        """Digest of what both sides must share besides the vector: the pre-trained model the
        method builds on and the method settings. A client refuses to train on a mismatch."""
        settings = OmegaConf.to_container(self.cfg, resolve=True)
        shared = {k: v for k, v in settings.items() if k not in self.local_settings}
        digest = hashlib.sha256(self._checkpoint.encode())
        digest.update(json.dumps(shared, sort_keys=True).encode())
        return digest.hexdigest()

    # --- where it computes ---------------------------------------------------------------
    def to(self, device: torch.device | str) -> Method:
        """Move the model and everything trained (in place: the trained tensors stay the same
        objects) to `device`. Build the method first, on the CPU: the mask and the fingerprint are
        the host's, whatever the device."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    # --- the packed vector ------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return sum(p.numel() for p in self.head)

    def num_values(self) -> int:
        """Values exchanged per direction (the vector's length; top-k sends fewer)."""
        return sum(t.numel() for t in self.state_tensors())

    def num_trainable(self) -> int:
        """Values the local optimizer updates."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def pack(self) -> np.ndarray:
        # float32 on the host, whatever the device: the same bytes from a CPU and a GPU node
        return torch.cat([t.detach().reshape(-1).float().cpu() for t in self.state_tensors()]).numpy()

    @torch.no_grad()
    def unpack(self, vector: np.ndarray) -> None:
        tensors = self.state_tensors()
        expected = sum(t.numel() for t in tensors)
        if vector.ndim != 1 or vector.size != expected:
            raise ValueError(
                f"{self.name}: packed vector has shape {vector.shape}, expected "
                f"({expected},). Client and server must use the same model and method config."
            )
        offset = 0
        flat = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        for t in tensors:  # copy_ moves each slice to the tensor's device
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    # --- wire encoding (identity: the vector is the message) ---------------------------
    def encode(self, vector: np.ndarray, reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {"values": vector.astype(np.float32, copy=False)}

    def decode(self, arrays: dict[str, np.ndarray], reference: np.ndarray | None = None) -> np.ndarray:
        return arrays["values"]

    def wire_reference(self, arrays: dict[str, np.ndarray], reference: np.ndarray) -> np.ndarray:
        """`reference`'s entries where an uplink's `values` go (its other arrays say where): what a
        compressed update is added to. Identity for a method that sends the whole vector."""
        return reference

    def initial_state(self) -> np.ndarray:
        """The vector before any training (what the server starts from)."""
        if not hasattr(self, "_initial"):
            self._initial = self.pack()
        return self._initial
