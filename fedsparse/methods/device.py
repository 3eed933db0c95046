"""Where a model computes (`train.device`) and in which precision (`train.precision`).

`auto` is a GPU when one is visible to this process, else the CPU. Only the computation moves:
the mask, the fingerprint and the packed vector are computed on the host in float32, so a
message is the same bytes whatever device a node trains on (docs/configuration.md, Devices).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

DEVICE_SETTINGS = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_problem(setting: object) -> str | None:
    """Why `train.device=<setting>` cannot run in this process (one line naming the key), or None."""
    text = str(setting)
    if not _DEVICE.match(text):
        return f"train.device={text}: use {DEVICE_SETTINGS}"
    if not text.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"train.device={text}: no CUDA GPU is visible to this process; use train.device=auto or cpu"
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        return (
            f"train.device={text}: this process sees {torch.cuda.device_count()} GPU(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); use train.device=auto or cuda"
        )
    return None


def resolve_device(setting: object = "auto") -> torch.device:
    """The torch device of a `train.device` setting; raises ValueError (one line) when it cannot run."""
    problem = device_problem(setting)
    if problem:
        raise ValueError(problem)
    text = str(setting)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def precision_problem(precision: object, device: torch.device | None = None) -> str | None:
    """Why `train.precision=<precision>` cannot run (on `device`, when given), or None."""
    if precision not in PRECISIONS:
        return f"train.precision={precision}: use one of {PRECISIONS}"
    if precision == "bf16" and device is not None and device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            return f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp32"
    return None


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The forward's precision: bfloat16 autocast for `bf16` (parameters, optimiser state and the
    packed vector stay float32), nothing for `fp32`."""
    problem = precision_problem(precision, device)
    if problem:
        raise ValueError(problem)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators seeded with `seed` for the block (the CPU's, and this device's
    when it is a GPU), and restored afterwards."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
