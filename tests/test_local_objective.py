"""Local training options: FedProx (the server sends `proximal-mu` each round; clients add
mu/2 ||w - w_global||^2) and a separate learning rate for the classification head."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from harness.models import method_cfg, tiny_model

from fedsparse.apps.server_app import make_strategy
from fedsparse.config import training_settings
from fedsparse.federation.accounting import CommLedger
from fedsparse.federation.strategy import PackedFedProx
from fedsparse.methods import build_method
from fedsparse.methods.model import TINY_BERT, load_tokenizer
from fedsparse.run import compose_config
from fedsparse.training.train import _batches, make_loader, train

LR, STEPS, SEED = 1e-2, 8, 3


def _loader():
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    texts = [f"the film was {words[i % 6]} and {words[(i * 5) % 6]}" for i in range(48)]
    data = datasets.Dataset.from_dict({"sentence1": texts, "label": [i % 2 for i in range(48)]})
    return make_loader(data, load_tokenizer(TINY_BERT), 32, 8, shuffle=True)


def _method():
    return build_method(tiny_model(), method_cfg("pafi", density=0.05))


def _trained(mu: float = 0.0, head_lr_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of the packed vector after local training with these options."""
    method = _method()
    start = method.pack().copy()
    train(method, _loader(), LR, steps=STEPS, seed=SEED, proximal_mu=mu, head_lr_scale=head_lr_scale)
    return start, method.pack()


def test_proximal_gradient_equals_autograd_of_the_proximal_loss():
    """The reference adds mu/2 ||w - w0||^2 to the loss and lets autograd differentiate it."""
    mu = 0.5
    _, ours = _trained(mu)
    method, loader = _method(), _loader()
    params = list(method.parameters())
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    loader.generator.manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        method.model.train()
        for batch in _batches(loader, STEPS):
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
            (method.model(**batch).loss + mu / 2 * prox).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    np.testing.assert_allclose(ours, method.pack(), rtol=0, atol=1e-6)


def test_mu_zero_trains_exactly_as_fedavg_and_a_larger_mu_stays_closer():
    start, plain = _trained(0.0)
    method = _method()
    train(method, _loader(), LR, steps=STEPS, seed=SEED)  # no proximal_mu at all
    assert np.array_equal(plain, method.pack())
    drift = [np.linalg.norm(_trained(mu)[1] - start) for mu in (0.0, 1.0, 100.0)]
    assert drift[0] > drift[1] > drift[2] > 0


def test_the_strategy_sends_proximal_mu_in_every_train_message(app_identity):
    cfg = compose_config(["model=tiny", "federation.strategy=fedprox", "federation.proximal_mu=0.3"])
    method = build_method(tiny_model(), cfg.method)
    strategy = make_strategy(cfg, method, CommLedger(method.head_size))
    assert isinstance(strategy, PackedFedProx) and strategy.proximal_mu == 0.3
    strategy.sampler.node_of = {p: 100 + p for p in range(cfg.federation.num_clients)}

    class Grid:
        def get_node_ids(self):
            return list(strategy.sampler.node_of.values())

    arrays = ArrayRecord({"values": Array(method.initial_state())})
    messages = strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), Grid())
    assert len(messages) == cfg.federation.clients_per_round
    assert all(m.content["config"]["proximal-mu"] == 0.3 for m in messages)


def test_proximal_mu_names_only_fedprox_runs():
    """Runs saved before FedProx existed keep their auto names; fedprox runs differ by mu."""
    plain = training_settings(compose_config(["federation.proximal_mu=5"]))
    assert "proximal_mu" not in plain["federation"]
    names = {
        compose_config(
            ["run_name=auto", "federation.strategy=fedprox", f"federation.proximal_mu={mu}"]
        ).run_name
        for mu in (0.01, 0.1)
    }
    assert len(names) == 2
    with pytest.raises(ValueError, match=r"proximal_mu=\S+: must be >= 0"):
        compose_config(["federation.strategy=fedprox", "federation.proximal_mu=-1"])


def test_head_lr_scale_slows_only_the_head():
    start, plain = _trained()
    assert np.array_equal(_trained(head_lr_scale=1.0)[1], plain)
    _, slow = _trained(head_lr_scale=1e-3)
    head = _method().head_size  # the head is the packed vector's tail
    moved = np.abs(slow - start)
    assert moved[-head:].max() < 1e-3 * LR * STEPS * 1.01  # AdamW moves an entry <= lr per step
    assert np.abs(plain - start)[-head:].max() > 0.5 * LR  # at the full rate the head does move
    assert moved[:-head].max() > 0.5 * LR  # the masked entries still train at lr
    with pytest.raises(ValueError, match=r"head_lr_scale=\S+: must be > 0"):
        compose_config(["train.head_lr_scale=0"])


def test_fedprox_trains_the_biases_of_masked_linears():
    """A masked Linear's bias gets its gradient through the masked backward, so the proximal
    term has a gradient to add to and the bias values move (AdamW: by about lr in one step)."""
    cfg = method_cfg("pafi", scope="per_tensor", density=0.5, groups="attention,bias")
    method = build_method(tiny_model(), cfg)
    names = [n for n, i in zip(method.mask.names, method.mask.indices) if i.numel()]
    before = [v.detach().clone() for v in method.values]
    train(method, _loader(), LR, steps=1, seed=SEED, proximal_mu=0.1)
    moved = {n: (v.detach() - b).abs().max().item() for n, v, b in zip(names, method.values, before)}
    # a key bias shifts every score of a query alike, which softmax ignores: its gradient is ~0
    biases = [n for n in names if n.endswith(".bias") and ".key." not in n]
    assert len(biases) == 11 and all(moved[n] > 0.5 * LR for n in biases), moved
