"""One registry from method name to implementation; configs name methods, never classes."""

from __future__ import annotations

from omegaconf import DictConfig
from transformers import PreTrainedModel

from fedsparse.methods.base import Method
from fedsparse.methods.dense import BitFit, Full
from fedsparse.methods.hiwi import HiWi
from fedsparse.methods.lora import LoRA
from fedsparse.methods.pafi import PaFi
from fedsparse.methods.topk import TopK

METHODS: dict[str, type[Method]] = {m.name: m for m in (PaFi, HiWi, Full, BitFit, LoRA, TopK)}


def build_method(model: PreTrainedModel, cfg: DictConfig) -> Method:
    """Wrap `model` with the method named by `cfg.name` (a `method/` config group entry)."""
    if cfg.name not in METHODS:
        raise ValueError(f"Unknown method '{cfg.name}': choose one of {', '.join(METHODS)}.")
    method = METHODS[cfg.name](model, cfg)
    method.initial_state()  # remember the untrained state (server start, top-k reference)
    return method


__all__ = ["METHODS", "Method", "build_method"]
