"""Model loading: bundled, tiny and missing models."""

from __future__ import annotations

import pytest
import torch

from fedsparse.methods.model import (
    TINY_BERT,
    bundled_minilm_path,
    head_parameter_names,
    load_model,
    load_tokenizer,
)


def test_tiny_model_is_deterministic_per_seed_and_uses_a_real_tokenizer():
    a, b, c = (
        load_model(TINY_BERT, 2, seed=1),
        load_model(TINY_BERT, 2, seed=1),
        load_model(TINY_BERT, 2, seed=2),
    )
    wa, wb, wc = (m.bert.encoder.layer[0].intermediate.dense.weight for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()
    assert head_parameter_names(a) == ["classifier.weight", "classifier.bias"]
    assert load_tokenizer(TINY_BERT)("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_bundled_minilm_is_found_offline():
    assert (bundled_minilm_path() + "/config.json").endswith("model/config.json")


def test_a_missing_model_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model=minilm"):
        load_model(str(tmp_path / "no-such-model"), 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_loads_in_float32(dtype, tmp_path):
    """transformers 5 would keep the saved dtype (dtype="auto")."""
    saved = load_model(TINY_BERT, 2, seed=1).to(dtype)
    saved.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), 2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert torch.equal(weight, saved.bert.encoder.layer[0].intermediate.dense.weight.float())
