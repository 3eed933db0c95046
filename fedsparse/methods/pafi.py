"""PaFi (Liao et al. 2023): train only the smallest-magnitude pre-trained weights.

The mask is a pure function of the checkpoint, so every task and every client derives the same
one and only the values at masked entries travel. Training scatters a small trainable value
vector into the frozen weights (a parametrization), so the optimizer holds state only for the
masked entries and every other weight stays bitwise equal to the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from fedsparse.data import cache
from fedsparse.methods.base import Method

GROUPS = ("attention", "ffn", "embeddings", "layernorm", "bias", "pooler")
# How a masked Linear weight's gradient is computed (`method.masked_backward`): a sampled dense-dense
# product at the mask (SDDMM), a gather over the tokens, or autograd through the dense weight.
# `experiments/step_time.py` measures them; true/false are the values of runs saved before the
# choice existed (true was the gather kernel).
BACKWARDS = {"sddmm": "sddmm", "gather": "gather", "dense": "dense", True: "gather", False: "dense"}
SCOPES = ("global", "per_tensor")
SELECTS = ("smallest", "largest", "random")
# torch says so once per process when the SDDMM kernel builds its first CSR pattern; nothing to act on
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def parse_groups(groups: str) -> list[str]:
    names = [g.strip() for g in str(groups).split(",") if g.strip()]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown or not names:
        raise ValueError(
            f"Unknown or empty mask groups {unknown or names}: choose a comma-separated "
            f"subset of {', '.join(GROUPS)} (default attention,ffn)."
        )
    return names


def _group_of(module_name: str, module: nn.Module, param_name: str) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "LayerNorm" in type(module).__name__:
        return "layernorm"
    if isinstance(module, nn.Linear):
        if param_name == "bias":
            return "bias"
        if ".pooler" in module_name:
            return "pooler"
        if ".layer." in module_name:
            return "attention" if ".attention." in module_name else "ffn"
    return None


def candidate_parameters(model: PreTrainedModel, groups: str) -> list[tuple[str, nn.Parameter]]:
    """Backbone parameters eligible for the mask, in the model's own (deterministic) order."""
    wanted = set(parse_groups(groups))
    prefix = model.base_model_prefix + "."
    found = []
    for module_name, module in model.named_modules():
        if not module_name.startswith(prefix):
            continue  # the task head is trained densely, never masked
        for param_name, param in module.named_parameters(recurse=False):
            if _group_of(module_name, module, param_name) in wanted:
                found.append((f"{module_name}.{param_name}", param))
    if not found:
        raise ValueError(f"No parameters of {type(model).__name__} fall in groups '{groups}'.")
    return found


def _k_extreme(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest scores; ties broken by position (tensor order, flat index)."""
    threshold = torch.kthvalue(scores, k).values
    below = torch.nonzero(scores < threshold).flatten()
    ties = torch.nonzero(scores == threshold).flatten()[: k - below.numel()]
    return torch.sort(torch.cat([below, ties])).values


def select_entries(tensors: list[torch.Tensor], density: float, select: str, seed: int) -> torch.Tensor:
    """Flat indices (into the concatenation of `tensors`) of the round(density x size) trainable
    entries; none when that rounds to 0 (a small tensor under `per_tensor` scope)."""
    total = sum(t.numel() for t in tensors)
    k = round(density * total)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if select == "random":
        perm = np.random.default_rng(seed).permutation(total)[:k]
        return torch.from_numpy(np.sort(perm))
    scores = torch.cat([t.detach().reshape(-1).abs() for t in tensors])  # exact in the stored dtype
    return _k_extreme(scores if select == "smallest" else -scores, k)


@dataclass
class Mask:
    names: list[str]
    shapes: list[tuple[int, ...]]
    indices: list[torch.Tensor]  # flat int64 indices per tensor, sorted
    fingerprint: str

    @property
    def size(self) -> int:
        return sum(i.numel() for i in self.indices)


def compute_mask(
    model: PreTrainedModel,
    density: float = 0.005,
    scope: str = "global",
    select: str = "smallest",
    groups: str = "attention,ffn",
    seed: int = 0,
) -> Mask:
    """The data-free PaFi mask. Identical on every machine that holds the same checkpoint."""
    if scope not in SCOPES or select not in SELECTS:
        raise ValueError(
            f"pafi.scope must be one of {SCOPES} and pafi.select one of {SELECTS}; "
            f"got scope={scope}, select={select}."
        )
    if not 0 < density <= 1:
        raise ValueError(f"pafi.density={density}: use 0 < density <= 1.")
    named = candidate_parameters(model, groups)
    tensors = [p for _, p in named]
    if scope == "global":
        flat = select_entries(tensors, density, select, seed)
        bounds = np.cumsum([0] + [t.numel() for t in tensors])
        cuts = np.searchsorted(flat.numpy(), bounds)
        indices = [flat[a:b] - int(lo) for a, b, lo in zip(cuts[:-1], cuts[1:], bounds[:-1])]
    else:
        indices = [select_entries([t], density, select, seed + i) for i, t in enumerate(tensors)]
    total = sum(t.numel() for t in tensors)
    if sum(i.numel() for i in indices) == 0:
        raise ValueError(
            f"pafi.density={density} selects no entry of the {total} candidates (scope={scope}): "
            "raise the density or add groups."
        )
    names = [n for n, _ in named]
    shapes = [tuple(t.shape) for t in tensors]
    digest = hashlib.sha256(
        json.dumps(
            {
                "names": names,
                "shapes": shapes,
                "density": density,
                "scope": scope,
                "select": select,
                "seed": seed if select == "random" else None,
            }
        ).encode()
    )
    for idx in indices:  # the weights themselves are in `Method.fingerprint`
        digest.update(idx.numpy().astype("<i8").tobytes())
    return Mask(names, shapes, [i.long() for i in indices], digest.hexdigest())


def cached_mask(model: PreTrainedModel, checkpoint: str, cfg: DictConfig) -> Mask:
    """`compute_mask` through the node's disk cache (`fedsparse.data.cache`), keyed by the checkpoint
    digest and the mask settings: a deployment ClientApp process would otherwise rank every
    candidate weight (seconds on MiniLM) for each message it serves."""
    settings = {k: cfg[k] for k in ("density", "scope", "select", "groups", "seed")}
    named = candidate_parameters(model, settings["groups"])
    sizes = [p.numel() for _, p in named]

    def compute() -> cache.Arrays:
        mask = compute_mask(model, **settings)
        return {
            "fingerprint": np.array(mask.fingerprint),
            **{f"i{j}": i.numpy() for j, i in enumerate(mask.indices)},
        }

    def valid(arrays: cache.Arrays) -> bool:
        indices = [arrays[f"i{j}"] for j in range(len(sizes))]
        return len(arrays) == len(sizes) + 1 and all(
            i.dtype == np.int64
            and i.ndim == 1
            and (i.size == 0 or (i[0] >= 0 and i[-1] < n))
            and bool(np.all(np.diff(i) > 0))
            for i, n in zip(indices, sizes)
        )

    arrays = cache.cached(cache.key("pafi-mask", checkpoint=checkpoint, **settings), compute, valid)
    return Mask(
        [n for n, _ in named],
        [tuple(p.shape) for _, p in named],
        [torch.from_numpy(arrays[f"i{j}"]) for j in range(len(sizes))],
        str(arrays["fingerprint"]),
    )


class SparseValues(nn.Module):
    """Parametrization: weight with the masked entries replaced by a trainable vector."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.values = nn.Parameter(weight.detach().reshape(-1)[index].clone())
        if weight.ndim == 2:  # the entries' (row, column), and the mask in CSR, for a Linear's backward
            rows = index // weight.shape[1]
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", index % weight.shape[1], persistent=False)
            crow = torch.zeros(weight.shape[0] + 1, dtype=torch.long)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=weight.shape[0]), 0)
            self.register_buffer("crow", crow, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(-1).index_put((self.index,), self.values).view_as(weight)


class SparseLinear(torch.autograd.Function):
    """y = x W^T + b, W the frozen weight with the trainable values at the mask.

    Autograd through the parametrization would form the dense weight gradient dy^T x (a matmul as
    large as the forward) only to keep 0.5% of it. Here only the masked entries' gradients are
    computed, sum_t dy[t, row] * x[t, col]: by default as one SDDMM (`torch.sparse.sampled_addmm`
    on the mask's CSR pattern), or as a gather of the entries' rows and columns over the tokens.
    A masked bias (group `bias`) gets its gradient sum_t dy[t], which its own parametrization
    then gathers at its mask.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, sparse: SparseValues, kernel: str):
        effective = weight.reshape(-1).index_put((sparse.index,), values).view_as(weight)
        # Under autocast (train.precision=bf16) the product runs in the autocast dtype, as
        # F.linear's would; inside a custom Function the casts are explicit, so that the
        # backward's products meet operands of one dtype ("expected m1 and m2 to have the same
        # dtype" otherwise). The gradients of the trained values are accumulated in float32.
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, wc = x.to(dtype), effective.to(dtype)
            out = F.linear(xc, wc, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, wc)
        ctx.sparse, ctx.kernel = sparse, kernel
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, effective = ctx.saved_tensors
        sparse = ctx.sparse
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out.to(effective.dtype) @ effective).to(ctx.x_dtype)
        values_dtype = sparse.values.dtype  # float32: the trained state's dtype
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(values_dtype)
        xs = x.reshape(-1, x.shape[-1]).to(values_dtype)
        grad_bias = dy.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        if ctx.kernel == "sddmm":
            pattern = torch.sparse_csr_tensor(
                sparse.crow, sparse.cols, sparse.values.detach(), effective.shape, check_invariants=False
            )
            grad_values = torch.sparse.sampled_addmm(pattern, dy.t(), xs, beta=0.0).values()
        else:  # feature-major copies, so that gathering an entry's row/column reads contiguous memory
            dy, xs = dy.t().contiguous(), xs.t().contiguous()
            grad_values = (dy.index_select(0, sparse.rows) * xs.index_select(0, sparse.cols)).sum(1)
        return grad_x, None, grad_bias, grad_values, None, None


def masked_linear_forward(module: nn.Linear, sparse: SparseValues, kernel: str):
    """A forward for `module` that trains only the masked entries of its (frozen) weight."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.parametrizations.weight.original
        return SparseLinear.apply(x, weight, module.bias, sparse.values, sparse, kernel)

    return forward


class PaFi(Method):
    name = "pafi"
    local_settings = ("lr", "masked_backward")  # the backward computes the same gradients either way

    def __init__(self, model: PreTrainedModel, cfg: DictConfig):
        super().__init__(model, cfg)
        self.mask = cached_mask(model, self._checkpoint, cfg)
        kernel = BACKWARDS.get(cfg.get("masked_backward", "sddmm"))
        if kernel is None:
            raise ValueError(
                f"method.masked_backward={cfg.masked_backward}: use sddmm (default), gather or dense"
            )
        modules = dict(model.named_modules())
        self.values: list[nn.Parameter] = []
        self.sites: list[tuple[nn.Module, str]] = []  # (module, attribute) carrying a parametrization
        for name, index in zip(self.mask.names, self.mask.indices):
            if index.numel() == 0:
                continue  # a global ranking may leave a tensor untouched
            module_name, attr = name.rsplit(".", 1)
            module = modules[module_name]
            sparse = SparseValues(getattr(module, attr), index)
            parametrize.register_parametrization(module, attr, sparse)
            if kernel != "dense" and attr == "weight" and isinstance(module, nn.Linear):
                module.forward = masked_linear_forward(module, sparse, kernel)
            self.values.append(sparse.values)
            self.sites.append((module, attr))

    def state_tensors(self) -> list[torch.Tensor]:
        return self.values + self.head

    def fingerprint(self) -> str:
        """Also the mask itself: the same settings must select the same entries everywhere."""
        return hashlib.sha256((super().fingerprint() + self.mask.fingerprint).encode()).hexdigest()

    def merge(self) -> PreTrainedModel:
        """Fold the values into plain weights; the model is a stock HF model afterwards."""
        for module, _ in self.sites:
            module.__dict__.pop("forward", None)  # back to the class's own forward
        return self._fold(self.sites)
