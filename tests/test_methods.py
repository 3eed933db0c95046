"""Methods on a tiny random BERT: masks, training invariants, packing, merging."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from harness.models import CONF, method_cfg, tiny_model
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from fedsparse.apps import client_train
from fedsparse.methods import METHODS, build_method
from fedsparse.methods.index_codec import decode_indices, encode_indices
from fedsparse.methods.model import head_parameter_names
from fedsparse.methods.pafi import GROUPS, candidate_parameters, compute_mask
from fedsparse.run import compose_config


def _train_steps(method, batch, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(method.parameters(), lr=lr)
    for _ in range(steps):
        method.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _brute_force(model, density, select="smallest"):
    """Sort every candidate entry by (|w|, tensor order, flat index) in plain Python."""
    entries = []
    for t_idx, (_, p) in enumerate(candidate_parameters(model, "attention,ffn")):
        for i, w in enumerate(p.detach().reshape(-1).tolist()):
            key = abs(w) if select == "smallest" else -abs(w)
            entries.append((key, t_idx, i))
    entries.sort()
    k = round(density * len(entries))
    return sorted((t, i) for _, t, i in entries[:k])


@pytest.mark.parametrize("select", ["smallest", "largest"])
def test_pafi_mask_equals_brute_force(select):
    model = tiny_model()
    # integer-valued weights create many exact ties: the tie-break must be (tensor, index)
    with torch.no_grad():
        for _, p in candidate_parameters(model, "attention,ffn"):
            p.copy_(torch.round(p * 20))
    mask = compute_mask(model, density=0.05, select=select)
    got = sorted((t, int(i)) for t, idx in enumerate(mask.indices) for i in idx)
    assert got == _brute_force(model, 0.05, select)
    assert mask.size == round(0.05 * sum(p.numel() for _, p in candidate_parameters(model, "attention,ffn")))


def test_pafi_per_tensor_scope_takes_the_same_fraction_of_each_tensor():
    model = tiny_model()
    mask = compute_mask(model, density=0.1, scope="per_tensor")
    for (name, p), idx in zip(candidate_parameters(model, "attention,ffn"), mask.indices):
        assert idx.numel() == round(0.1 * p.numel()), name
        smallest = torch.sort(p.detach().reshape(-1).abs()).values[: idx.numel()]
        assert torch.equal(torch.sort(p.detach().reshape(-1)[idx].abs()).values, smallest)


def test_pafi_per_tensor_scope_skips_tensors_too_small_for_one_entry(batch):
    """round(density x size) entries per tensor: a 32-entry bias at 1% gets none, as under global
    scope, instead of an error; a density that selects nothing anywhere names the fix."""
    groups = "attention,ffn,bias,layernorm"
    method = build_method(tiny_model(), method_cfg("pafi", density=0.01, scope="per_tensor", groups=groups))
    sizes = {n: idx.numel() for n, idx in zip(method.mask.names, method.mask.indices)}
    params = dict(tiny_model().named_parameters())
    assert sizes == {n: round(0.01 * params[n].numel()) for n in sizes}
    assert sizes["bert.encoder.layer.0.attention.self.query.bias"] == 0 < method.mask.size
    _train_steps(method, batch, steps=1)
    with pytest.raises(ValueError, match="selects no entry.*raise the density"):
        compute_mask(tiny_model(), density=1e-4, scope="per_tensor")


def test_pafi_random_select_is_seeded():
    model = tiny_model()
    a = compute_mask(model, density=0.05, select="random", seed=1)
    b = compute_mask(model, density=0.05, select="random", seed=1)
    c = compute_mask(model, density=0.05, select="random", seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint


FINGERPRINT_SCRIPT = """
from omegaconf import OmegaConf
from fedsparse.methods import build_method
from fedsparse.methods.model import TINY_BERT, load_model
cfg = OmegaConf.merge(OmegaConf.load({conf!r}), {{"density": 0.05}})
print(build_method(load_model(TINY_BERT, 2, seed=0), cfg).fingerprint())
"""


def test_fingerprint_is_identical_across_processes():
    conf = str(CONF / "method" / "pafi.yaml")  # what method_cfg("pafi", density=0.05) loads
    prints = [
        subprocess.run(
            [sys.executable, "-c", FINGERPRINT_SCRIPT.format(conf=conf)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len(prints[0]) == 64 and prints[0] == prints[1]
    assert build_method(tiny_model(), method_cfg("pafi", density=0.05)).fingerprint() == prints[0]


# a change of each method's own settings (full and bitfit have none besides name and lr)
SETTING_CHANGES = {
    "pafi": {"density": 0.01},
    "topk": {"index_encoding": "varint"},
    "hiwi": {"rank": 4},
    "lora": {"alpha": 8},
}


def _fingerprint(method: str, model=None, **settings) -> str:
    return build_method(model or tiny_model(), method_cfg(method, **settings)).fingerprint()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fingerprint_covers_the_checkpoint_and_the_settings(name, batch):
    method = build_method(tiny_model(), method_cfg(name))
    before = method.fingerprint()
    assert len(before) == 64 and _fingerprint(name) == before  # stable across builds
    _train_steps(method, batch, steps=1)
    assert method.fingerprint() == before  # taken before training changed any weight
    assert _fingerprint(name, lr=1.0) == before  # the lr travels with each message
    if name in SETTING_CHANGES:
        assert _fingerprint(name, **SETTING_CHANGES[name]) != before
    for module in ("bert.encoder.layer.1.output.dense.weight", "classifier.weight"):
        model = tiny_model()
        with torch.no_grad():
            model.get_parameter(module).view(-1)[0] += 1e-3  # one pre-trained (or head) weight
        assert _fingerprint(name, model) != before, module
    assert _fingerprint(name, tiny_model(seed=1)) != before  # another seed: another head


def test_every_method_has_its_own_fingerprint_on_the_same_checkpoint():
    assert len({_fingerprint(name) for name in METHODS}) == len(METHODS)


@pytest.fixture
def fresh_client_cache():
    """`client_app` keeps one model per process: start and leave it empty."""
    client_train._method.cache_clear()
    yield
    client_train._method.cache_clear()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_client_on_another_checkpoint_refuses_to_train(name, app_identity, fresh_client_cache, monkeypatch):
    cfg = compose_config(["model=tiny", f"method={name}"])
    server = build_method(tiny_model(seed=cfg.seed), cfg.method)
    wire = server.encode(server.initial_state())
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in wire.items()}),
            "config": ConfigRecord({"fingerprint": server.fingerprint(), "server-round": 1}),
        }
    )
    msg = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
    client_train._receive(client_train.client_method(cfg), msg, cfg, 0)  # the same checkpoint is accepted
    client_train._method.cache_clear()

    load = client_train.load_model

    def other_checkpoint(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight[5] += 1e-3  # one token nobody trains on
        return model

    monkeypatch.setattr(client_train, "load_model", other_checkpoint)
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), {})
    with pytest.raises(RuntimeError, match="Refusing to train"):
        client_train.handle_train(msg, context, cfg)


def test_pafi_fingerprint_covers_the_mask():
    model = tiny_model()
    a = compute_mask(model, density=0.05)
    with torch.no_grad():
        weight = candidate_parameters(model, "attention,ffn")[0][1]
        weight.view(-1)[weight.detach().abs().argmax()] = 0.0  # the largest entry becomes the smallest
    b = compute_mask(model, density=0.05)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint != compute_mask(tiny_model(), density=0.05, select="largest").fingerprint


def test_pafi_training_changes_only_masked_entries_and_keeps_small_optimizer_state(batch):
    pretrained = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    method = build_method(tiny_model(), method_cfg("pafi", density=0.05))
    opt = _train_steps(method, batch)
    # Adam state exists only for the value vectors and the head
    state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_numel == method.mask.size + method.head_size
    merged = dict(method.merge().named_parameters())
    assert set(merged) == set(pretrained)
    masked = {n: idx for n, idx in zip(method.mask.names, method.mask.indices)}
    changed_entries = 0
    for name, before in pretrained.items():
        after = merged[name].detach()
        if name.startswith("classifier"):
            continue
        keep = torch.ones(before.numel(), dtype=torch.bool)
        if name in masked:
            keep[masked[name]] = False
            changed_entries += int((after.reshape(-1)[~keep] != before.reshape(-1)[~keep]).sum())
        # bitwise: compare the raw bytes of the non-masked entries
        assert torch.equal(
            after.reshape(-1)[keep].view(torch.int32), before.reshape(-1)[keep].view(torch.int32)
        ), name
    assert changed_entries > 0.9 * method.mask.size


@pytest.mark.parametrize("kernel", ["sddmm", "gather", True])
def test_pafi_masked_backward_equals_autograd_through_the_dense_weight(batch, kernel):
    """Each masked kernel's gradient of the masked entries is the dense weight gradient at the
    mask (`True`, what runs saved before the choice say, is the gather kernel)."""
    grads, logits = [], []
    for backward in (kernel, "dense"):
        method = build_method(tiny_model(), method_cfg("pafi", density=0.05, masked_backward=backward))
        method.model.eval()  # no dropout: both passes see the same function
        out = method.model(**batch)
        out.loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in method.parameters()]))
        logits.append(out.logits.detach())
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert grads[0][: method.mask.size].abs().max() > 0


# each mask group alone, the combination, and all of them (`method.groups`)
GROUP_CHOICES = [*GROUPS, "attention,bias", ",".join(GROUPS)]


@pytest.mark.parametrize("kernel", ["sddmm", "gather", "dense"])
@pytest.mark.parametrize("groups", GROUP_CHOICES)
def test_pafi_gradients_are_the_dense_models_at_the_mask_for_every_group(batch, groups, kernel):
    """Every trained tensor (a masked Linear's bias included) gets the gradient that autograd
    gives the plain model, gathered at the mask."""
    cfg = method_cfg("pafi", scope="per_tensor", density=0.5, groups=groups, masked_backward=kernel)
    method = build_method(tiny_model(), cfg)
    method.model.eval()  # no dropout: both models compute the same function
    method.model(**batch).loss.backward()
    dense = tiny_model().eval()
    dense(**batch).loss.backward()
    masked = [(n, i) for n, i in zip(method.mask.names, method.mask.indices) if i.numel()]
    head = head_parameter_names(dense)
    names = [n for n, _ in masked] + head
    expected = [dense.get_parameter(n).grad.reshape(-1)[i] for n, i in masked]
    expected += [dense.get_parameter(n).grad for n in head]
    params = method.parameters()
    assert len(params) == len(names)
    missing = [n for n, p in zip(names, params) if p.grad is None]
    assert not missing, f"{len(missing)} of {len(params)} trained tensors without a gradient: {missing}"
    for name, param, want in zip(names, params, expected):
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_pafi_refuses_an_unknown_backward():
    with pytest.raises(ValueError, match="sddmm"):
        build_method(tiny_model(), method_cfg("pafi", masked_backward="fast"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pack_unpack_round_trips_exactly(name, batch):
    kwargs = {"density": 0.05} if name in ("pafi", "topk") else {}
    method = build_method(tiny_model(), method_cfg(name, **kwargs))
    _train_steps(method, batch, steps=1)
    trained = method.pack()
    assert trained.dtype == np.float32 and trained.ndim == 1
    other = build_method(tiny_model(), method_cfg(name, **kwargs))
    other.unpack(trained)
    assert np.array_equal(other.pack(), trained)
    with torch.no_grad():
        assert torch.equal(other.model(**batch).logits, method.model(**batch).logits)
    with pytest.raises(ValueError, match="expected"):
        other.unpack(trained[:-1])


def _assert_merges_to_stock_model(method, batch, tmp_path):
    reference_names = {n: tuple(p.shape) for n, p in tiny_model().named_parameters()}
    with torch.no_grad():
        before = method.model(**batch).logits
    merged = method.merge()
    with torch.no_grad():
        after = merged(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert {n: tuple(p.shape) for n, p in merged.named_parameters()} == reference_names
    assert type(merged).__name__ == "BertForSequenceClassification"
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ["ffn_bias1", "ffn_biases", "ffn_weights"])
def test_hiwi_merges_to_a_stock_model(target, batch, tmp_path):
    method = build_method(tiny_model(), method_cfg("hiwi", target=target))
    with torch.no_grad():
        start = method.model(**batch).logits
        torch.testing.assert_close(start, tiny_model()(**batch).logits)  # W_up = 0: starts at the checkpoint
    _train_steps(method, batch)
    with torch.no_grad():
        assert not torch.allclose(method.model(**batch).logits, start)
    _assert_merges_to_stock_model(method, batch, tmp_path)


def test_hiwi_merged_exchange_sends_only_the_parameter_delta(batch):
    method = build_method(tiny_model(), method_cfg("hiwi", exchange="merged"))
    n_bias = sum(m.intermediate.dense.bias.numel() for m in method.model.bert.encoder.layer)
    assert method.num_values() == n_bias + method.head_size
    assert not method.pack()[:n_bias].any()  # nothing trained yet: zero delta
    _train_steps(method, batch)
    trained = method.pack()
    with torch.no_grad():
        logits = method.model(**batch).logits
    receiver = build_method(tiny_model(), method_cfg("hiwi", exchange="merged"))
    receiver.unpack(trained)  # rebuilds p' = p + delta under a fresh adapter
    with torch.no_grad():
        torch.testing.assert_close(receiver.model(**batch).logits, logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(receiver.pack(), trained, atol=1e-6)


def _hiwi_with_nonzero_biases(**settings):
    """HiWi on the tiny model, whose FFN biases start at 0 (where h = f(p W_down) = 0 and the
    adapter gets no gradient): give them MiniLM-like values first."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            bias = layer.intermediate.dense.bias
            bias.copy_(0.15 * torch.randn(bias.shape, generator=gen))
    return build_method(model, method_cfg("hiwi", exchange="merged", **settings))


def _h_l1(method) -> float:
    with torch.no_grad():
        return sum(
            a.act(m.parametrizations[attr].original @ a.down).abs().sum().item()
            for a, (_, m, attr) in zip(method.adapters, method.sites)
        )


def test_hiwi_trained_down_inflates_the_adapter_from_w_up_zero(batch):
    """The merged exchange's failure mode (docs/methods.md, HiWi): from W_up = 0, Adam moves every
    W_down entry by about lr per step whatever its tiny gradient, so h = f(p' W_down) grows by
    about lr * ||p'||_1 per step; with `train_down=false` h stays the seeded one."""
    trained, frozen = _hiwi_with_nonzero_biases(), _hiwi_with_nonzero_biases(train_down=False)
    h0 = _h_l1(trained)
    assert h0 > 0 and _h_l1(frozen) == pytest.approx(h0)
    assert {id(p) for p in frozen.parameters()} == {id(a.up) for a in frozen.adapters} | {
        id(p) for p in frozen.head
    }
    for method in (trained, frozen):
        _train_steps(method, batch, steps=20, lr=3e-3)
    assert _h_l1(trained) > 3 * h0  # MiniLM, one 20-step round: 0.43 -> 10.9 per layer
    assert _h_l1(frozen) == pytest.approx(h0)


def test_hiwi_frozen_down_merged_average_is_the_average_of_w_up(batch):
    """With W_down fixed and seeded alike on every client, the clients share h = f(p' W_down), so
    the mean of their merged changes h W_up_k is the adapter with the mean W_up: averaging the
    merged vectors is exactly FedAvg of the adapter."""
    clients = [_hiwi_with_nonzero_biases(train_down=False) for _ in range(2)]
    swapped = {**batch, "labels": 1 - batch["labels"]}
    for method, data in zip(clients, (batch, swapped)):
        _train_steps(method, data, steps=5, lr=3e-3)
    mean = np.mean([m.pack() for m in clients], axis=0)
    with torch.no_grad():  # client 0's adapter with the clients' mean W_up and mean head
        for a0, a1 in zip(clients[0].adapters, clients[1].adapters):
            a0.up.copy_((a0.up + a1.up) / 2)
        for h0, h1 in zip(clients[0].head, clients[1].head):
            h0.copy_((h0 + h1) / 2)
    np.testing.assert_allclose(clients[0].pack(), mean, atol=1e-6)


def test_lora_merges_to_a_stock_model(batch, tmp_path):
    method = build_method(tiny_model(), method_cfg("lora"))
    _train_steps(method, batch)
    _assert_merges_to_stock_model(method, batch, tmp_path)


def test_trainable_counts_follow_the_definitions():
    model = tiny_model()
    n_total = sum(p.numel() for p in model.parameters())
    head = 32 * 2 + 2
    counts = {name: build_method(tiny_model(), method_cfg(name)).num_values() for name in METHODS}
    assert counts["full"] == n_total
    assert (
        counts["bitfit"]
        == sum(
            p.numel() for n, p in model.named_parameters() if n.startswith("bert.") and n.endswith(".bias")
        )
        + head
    )
    assert counts["lora"] == 2 * 2 * (32 * 8 + 8 * 32) + head  # 2 layers x {query, value}
    assert counts["hiwi"] == 2 * (2 * 64 * 8) + head  # factors of the 64-wide FFN bias
    candidates = sum(p.numel() for _, p in candidate_parameters(model, "attention,ffn"))
    assert counts["pafi"] == counts["topk"] == round(0.005 * candidates) + head


@pytest.mark.parametrize("encoding", ["int32", "varint", "rice", "expgolomb", "bitmap", "auto"])
def test_topk_wire_carries_k_values_with_their_indices(encoding, batch):
    method = build_method(tiny_model(), method_cfg("topk", density=0.05, index_encoding=encoding))
    received = method.initial_state().copy()
    _train_steps(method, batch)
    local = method.pack()
    wire = method.encode(local, reference=received)
    assert wire["indices"].dtype == (np.int32 if encoding == "int32" else np.uint8)
    sent = decode_indices(wire["indices"], method.body_size, encoding)
    assert sent.size == method.k and method.check_wire(wire) is None
    change = np.abs(local - received)[: method.body_size]
    assert change[sent].min() >= np.sort(change)[-method.k]
    decoded = method.decode(wire, received)
    assert np.array_equal(decoded[sent], local[sent])
    assert np.array_equal(decoded[method.body_size :], local[method.body_size :])
    untouched = np.setdiff1d(np.arange(method.body_size), sent)
    assert np.array_equal(decoded[untouched], received[untouched])
    # downlink: only entries that differ from the checkpoint travel, in the same encoding
    down = method.encode(decoded)
    assert down["indices"].dtype == wire["indices"].dtype
    down_sent = decode_indices(down["indices"], method.body_size, encoding)
    assert np.array_equal(down_sent, sent[change[sent] > 0])
    assert np.array_equal(method.decode(down), decoded)
    # a reply with one value too few, or fewer than k indices, is refused by name
    assert "values for" in method.check_wire({"values": wire["values"][1:], "indices": wire["indices"]})
    fewer = {"values": wire["values"][1:], "indices": encode_indices(sent[1:], method.body_size, encoding)}
    assert f"expected k={method.k}" in method.check_wire(fewer)
    if encoding == "int32":
        with pytest.raises(ValueError, match="out of range"):
            method.decode({"values": wire["values"], "indices": wire["indices"] + method.body_size}, received)


def test_bad_method_settings_name_the_fix():
    with pytest.raises(ValueError, match="0 < density"):
        build_method(tiny_model(), method_cfg("pafi", density=0.0))
    with pytest.raises(ValueError, match="groups"):
        build_method(tiny_model(), method_cfg("pafi", groups="attention,mlp"))
    with pytest.raises(ValueError, match="hiwi.target"):
        build_method(tiny_model(), method_cfg("hiwi", target="ffn_bias3"))
    for rank in (0, -2):  # rank 0 trained only the head, silently; -2 was a raw torch error
        with pytest.raises(ValueError, match=f"hiwi.rank={rank}: use a rank >= 1"):
            build_method(tiny_model(), method_cfg("hiwi", rank=rank))
    with pytest.raises(ValueError, match="Unknown method"):
        build_method(tiny_model(), OmegaConf.create({"name": "diffpruning"}))
