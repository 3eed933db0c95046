"""LoRA baseline (Hu et al. 2022) through Hugging Face PEFT, merged to a plain model for inference."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel

from fedsparse.methods.base import Method


class LoRA(Method):
    name = "lora"

    def __init__(self, model: PreTrainedModel, cfg: DictConfig):
        from peft import LoraConfig, get_peft_model  # ~0.3 s, only for LoRA runs

        super().__init__(model, cfg)
        targets = [t.strip() for t in str(cfg.target_modules).split(",")]
        config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))  # same lora_A init in every process
            self.model = get_peft_model(model, config)
        for p in self.head:  # PEFT froze everything it did not add
            p.requires_grad_(True)
        self.lora = [p for n, p in self.model.named_parameters() if "lora_" in n]

    def state_tensors(self) -> list[torch.Tensor]:
        return self.lora + self.head

    def merge(self) -> PreTrainedModel:
        return self.model.merge_and_unload()
