"""Devices: `train.device`, `train.precision` and `federation.client_gpus` (docs/configuration.md,
Devices). The CPU side runs everywhere; the GPU side is skipped without a visible GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from harness.models import method_cfg, tiny_model

from fedsparse.apps.client_train import client_device
from fedsparse.apps.simulation import backend_config, client_gpu_problem
from fedsparse.config import auto_run_name, training_settings
from fedsparse.methods import build_method
from fedsparse.methods.device import autocast, resolve_device
from fedsparse.run import ConfigError, compose_config

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU (none visible to this process)")
CPU_ONLY = pytest.mark.skipif(not NO_GPU, reason="checks what happens without a GPU")
# every method, and each of PaFi's masked backwards
VARIANTS = [
    ("pafi", {"density": 0.05, "masked_backward": "sddmm"}),
    ("pafi", {"density": 0.05, "masked_backward": "gather"}),
    ("pafi", {"density": 0.05, "masked_backward": "dense"}),
    ("hiwi", {}),
    ("hiwi", {"exchange": "merged"}),
    ("lora", {}),
    ("bitfit", {}),
    ("full", {}),
    ("topk", {"density": 0.05}),
]
IDS = [f"{n}-{s.get('masked_backward', s.get('exchange', ''))}".rstrip("-") for n, s in VARIANTS]


def _method(name: str, settings: dict, device: str | None = None):
    method = build_method(tiny_model(), method_cfg(name, **settings))
    return method.to(resolve_device(device)) if device else method


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (4, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}


def _gradients(method, precision: str = "fp32") -> list[torch.Tensor]:
    """The trained tensors' gradients on one batch, without dropout, back on the host."""
    method.model.eval()
    device = method.device
    with autocast(device, precision):
        loss = method.model(**{k: v.to(device) for k, v in _batch().items()}).loss
    loss.backward()
    return [p.grad.detach().cpu() for p in method.parameters()]


# --- the setting --------------------------------------------------------------------------------


@CPU_ONLY
def test_auto_picks_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert compose_config([]).train.device == "auto"
    assert compose_config([]).train.precision == "fp32"
    assert compose_config([]).federation.client_gpus == 0


@CPU_ONLY
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_one_line_error_naming_train_device(setting):
    with pytest.raises(ConfigError) as err:
        compose_config([f"train.device={setting}"])
    assert f"train.device={setting}" in str(err.value) and "\n" not in str(err.value)
    # a deployed client, whose config is composed without validation, checks where it resolves
    cfg = compose_config([])
    cfg.train.device = setting
    with pytest.raises(ConfigError, match=rf"^train\.device={setting}: no CUDA GPU[^\n]*$"):
        client_device(cfg)


def test_unknown_device_and_precision_are_refused():
    with pytest.raises(ConfigError, match=r"train\.device=tpu: use auto, cpu, cuda or cuda:N"):
        compose_config(["train.device=tpu"])
    with pytest.raises(ConfigError, match=r"train\.precision=fp16: use one of \('fp32', 'bf16'\)"):
        compose_config(["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"federation\.client_gpus=-1"):
        compose_config(["federation.client_gpus=-1"])


# --- simulated clients share GPUs -----------------------------------------------------------------


def test_client_gpus_is_rays_num_gpus_per_actor():
    assert backend_config(compose_config([]))["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    shared = compose_config(["federation.client_gpus=0.25", "federation.client_cpus=2"])
    assert backend_config(shared)["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}


def test_simulated_clients_without_a_gpu_share_train_on_the_cpu(monkeypatch):
    """Ray leaves every GPU visible to an actor given 0 GPUs (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0):
    with client_gpus=0 a simulated client trains on the CPU even where it sees a GPU, and a
    deployed client (a SuperNode's ClientApp) takes the node's GPU through the same setting."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_config([])
    assert client_device(cfg, simulated=True) == torch.device("cpu")
    assert client_device(cfg, simulated=False) == torch.device("cuda")  # deployment: the node's GPU
    cfg.federation.client_gpus = 0.25
    assert client_device(cfg, simulated=True) == torch.device("cuda")  # the GPU Ray gave the actor
    cfg.federation.client_gpus, cfg.train.device = 0, "cuda"
    with pytest.raises(ConfigError, match=r"train\.device=cuda: simulated clients get no GPU"):
        client_device(cfg, simulated=True)
    assert "federation.client_gpus" in client_gpu_problem(cfg)  # refused before the simulation starts


@CPU_ONLY
def test_a_gpu_share_without_a_gpu_is_refused_before_ray_starts(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = compose_config(["federation.client_gpus=0.5"])
    assert client_gpu_problem(cfg).startswith("federation.client_gpus=0.5: no GPU is visible")
    cfg.federation.ray_address = "127.0.0.1:6379"  # a cluster's GPUs are the cluster's business
    assert client_gpu_problem(cfg) is None
    assert client_gpu_problem(compose_config([])) is None
    wasted = compose_config(["federation.client_gpus=0.5", "train.device=cpu"])
    assert "the GPU share would go unused" in client_gpu_problem(wasted)


def test_a_resumed_run_may_change_where_it_computes_but_not_its_precision():
    from fedsparse.run import _apply_resume_overrides

    cfg = compose_config([])
    cfg.resume = "outputs/some-run"
    moved = _apply_resume_overrides(cfg.copy(), ["train.device=cpu", "federation.client_gpus=0.5"])
    assert moved.train.device == "cpu" and moved.federation.client_gpus == 0.5
    with pytest.raises(ConfigError, match=r"train\.precision=bf16 \(the run has fp32\)"):
        _apply_resume_overrides(cfg.copy(), ["train.precision=bf16"])


# --- what a run computes ----------------------------------------------------------------------------


def test_the_device_stays_out_of_the_run_name_and_bf16_goes_in():
    base = compose_config(["run_name=auto"])
    for overrides in (["train.device=cpu"], ["federation.client_gpus=0.5"], ["train.precision=fp32"]):
        cfg = compose_config(["run_name=auto", *overrides])
        assert cfg.run_name == base.run_name, overrides
        assert training_settings(cfg) == training_settings(base)
    bf16 = compose_config(["run_name=auto", "train.precision=bf16"])
    assert bf16.run_name != base.run_name
    assert training_settings(bf16)["train"]["precision"] == "bf16"
    assert auto_run_name(bf16) == bf16.run_name


# --- the wire does not depend on the device -----------------------------------------------------


@pytest.mark.parametrize(("name", "settings"), VARIANTS, ids=IDS)
def test_packed_vector_and_fingerprint_do_not_depend_on_the_device_setting(name, settings):
    host, explicit, auto = (
        _method(name, settings),
        _method(name, settings, "cpu"),
        _method(name, settings, "auto"),
    )
    vector = host.pack()
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float32
    for other in (explicit, auto):
        assert np.array_equal(other.pack(), vector)
        assert other.fingerprint() == host.fingerprint()
    wire = auto.encode(auto.pack(), reference=host.initial_state())
    assert all(isinstance(a, np.ndarray) for a in wire.values())
    assert wire["values"].dtype == np.float32
    # unpack from the host vector into the device's tensors, and back, bit for bit
    auto.unpack(vector + 1)
    assert np.array_equal(auto.pack(), vector + 1)


# --- mixed precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["sddmm", "gather", "dense"])
def test_pafi_masked_backwards_run_under_bf16_autocast(kernel):
    """SparseLinear casts inside its autograd function: the backward's products meet one dtype
    (they used to fail with "expected m1 and m2 to have the same dtype"), the gradients of the
    float32 trained values are float32 and close to fp32's."""
    fp32 = _gradients(_method("pafi", {"density": 0.05, "masked_backward": kernel}))
    bf16_method = _method("pafi", {"density": 0.05, "masked_backward": kernel})
    bf16 = _gradients(bf16_method, "bf16")
    assert all(g.dtype == torch.float32 for g in bf16)
    assert all(p.dtype == torch.float32 for p in bf16_method.parameters())
    scale = max(float(g.abs().max()) for g in fp32)
    assert max(float((a - b).abs().max()) for a, b in zip(fp32, bf16)) < 0.05 * scale


def test_bf16_training_keeps_the_packed_vector_float32():
    from fedsparse.training.train import train

    method = _method("pafi", {"density": 0.05})
    start = method.pack().copy()
    batches = [_batch() for _ in range(3)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True, generator=torch.Generator())
    loss = train(method, loader, 1e-2, steps=3, precision="bf16")
    assert np.isfinite(loss)
    after = method.pack()
    assert after.dtype == np.float32 and not np.array_equal(after, start)


def test_fp32_gradients_are_unchanged_by_the_autocast_path():
    """fp32 (the default) computes exactly what it computed before precision existed."""
    for kernel in ("sddmm", "gather"):
        a = _gradients(_method("pafi", {"density": 0.05, "masked_backward": kernel}))
        b = _gradients(_method("pafi", {"density": 0.05, "masked_backward": kernel}), "fp32")
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- the GPU benchmark script -------------------------------------------------------------------------


def test_gpu_check_imports_without_flower_hydra_ray_or_datasets(tmp_path):
    """experiments/gpu_check.py runs where only torch, transformers, peft and omegaconf are
    installed: a tiny CPU smoke with those packages made unimportable."""
    blocked = ("flwr", "ray", "hydra", "datasets", "flwr_datasets")
    code = textwrap.dedent(
        f"""
        import importlib.abc, runpy, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        sys.argv = ["gpu_check.py", "--device", "cpu", "--tiny", "--steps", "1", "--repeats", "1",
                    "--batch-sizes", "4", "--length", "8", "--methods", "pafi (gather),lora",
                    "--out", {str(tmp_path)!r}]
        runpy.run_path({str(ROOT / "experiments" / "gpu_check.py")!r}, run_name="__main__")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = {p.suffix for p in tmp_path.iterdir()}
    assert written == {".md", ".json"}
    text = next(tmp_path.glob("*.md")).read_text()
    assert "torch" in text and "| pafi (gather) | True | True | float32 |" in text


# --- on a GPU -------------------------------------------------------------------------------------------


@NEEDS_GPU
def test_auto_picks_the_gpu_when_one_is_visible():
    assert resolve_device("auto").type == "cuda"
    assert compose_config(["train.device=cuda"]).train.device == "cuda"


@NEEDS_GPU
@pytest.mark.parametrize(("name", "settings"), VARIANTS, ids=IDS)
def test_every_method_has_the_same_gradients_and_bytes_on_cpu_and_gpu(name, settings):
    host, gpu = _method(name, settings), _method(name, settings, "cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert np.array_equal(host.pack(), gpu.pack()) and host.fingerprint() == gpu.fingerprint()
    a, b = _gradients(host), _gradients(gpu)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


@NEEDS_GPU
@pytest.mark.parametrize("kernel", ["sddmm", "gather", "dense"])
def test_pafi_bf16_on_the_gpu(kernel):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    fp32 = _gradients(_method("pafi", {"density": 0.05, "masked_backward": kernel}, "cuda"))
    bf16 = _gradients(_method("pafi", {"density": 0.05, "masked_backward": kernel}, "cuda"), "bf16")
    scale = max(float(g.abs().max()) for g in fp32)
    assert max(float((a - b).abs().max()) for a, b in zip(fp32, bf16)) < 0.05 * scale
