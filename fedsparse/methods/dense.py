"""Dense baselines: `full` (every parameter) and `bitfit` (every bias + the head)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from fedsparse.methods.base import Method
from fedsparse.methods.model import head_parameter_names


class Full(Method):
    """Plain FedAvg over the whole model."""

    name = "full"

    def __init__(self, model: PreTrainedModel, cfg: DictConfig):
        super().__init__(model, cfg)
        head = set(head_parameter_names(model))
        self.body = [p for n, p in model.named_parameters() if n not in head and self.selects(n)]
        for p in self.body:
            p.requires_grad_(True)

    def selects(self, name: str) -> bool:
        return True

    def state_tensors(self) -> list[torch.Tensor]:
        return self.body + self.head


class BitFit(Full):
    """Ben Zaken et al. 2022: train only the bias terms (and the new head)."""

    name = "bitfit"

    def selects(self, name: str) -> bool:
        return name.endswith(".bias")
