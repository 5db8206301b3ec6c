"""The shared plumbing: targeting, trainability, several adapters, merging, saving, bad input."""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from conftest import tiny_bert
from torch import nn

from peftlab import (
    AdapterLayer,
    AdapterLoadError,
    AdapterModel,
    ConfigError,
    HRAConfig,
    LoraConfig,
    MergeError,
    get_adapter_model,
)
from peftlab.files import CONFIG_NAME, WEIGHTS_NAME


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- config validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(bias="some"), "bias='some' is not supported"),
        (dict(orthogonality_weight=-1.0), "orthogonality_weight must be a finite number >= 0"),
        (dict(orthogonality_weight=float("nan")), "orthogonality_weight must be a finite number >= 0"),
        (dict(target_modules="query("), "not a valid regular expression"),
        (dict(target_modules=[1, 2]), "target_modules must be a list"),
        (dict(rank_pattern={"query": 0}), "rank_pattern"),
        (dict(layers_to_transform=[-1]), "layers_to_transform"),
        (dict(forward_path="fast"), "forward_path"),
    ],
)
def test_invalid_config_values_fail_at_config_time(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HRAConfig(**kwargs)


def test_lora_dropout_is_validated():
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(dropout=1.5)


def test_config_json_round_trip_and_unknown_fields():
    config = HRAConfig(r=6, target_modules=["query"], rank_pattern={"value": 2}, orthogonality_weight=1e-4)
    data = json.loads(config.to_json())
    assert data["method"] == "hra" and data["peftlab_version"]
    assert HRAConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="known methods"):
        HRAConfig.from_dict({**data, "method": "dora"})
    with pytest.raises(ConfigError, match="no field"):
        HRAConfig.from_dict({**data, "lamda": 1})


# -- targeting -------------------------------------------------------------------------------------------
def test_target_that_matches_nothing_lists_adaptable_layers(bert):
    with pytest.raises(ValueError, match=r"matched nothing in BertForSequenceClassification.*query, key, value, dense"):
        get_adapter_model(bert, HRAConfig(target_modules=["q_proj"]))


def test_unsupported_layer_type_is_named(bert):
    with pytest.raises(ValueError, match="LayerNorm"):
        get_adapter_model(bert, HRAConfig(target_modules=["LayerNorm"]))


def test_rank_larger_than_input_fails_before_touching_the_model(bert):
    with pytest.raises(ValueError, match=r"layer.0.attention.self.query: r=40 exceeds .* d_in=32"):
        get_adapter_model(bert, HRAConfig(r=40, target_modules=["query", "intermediate.dense"]))
    assert not any(isinstance(m, AdapterLayer) for m in bert.modules())


def test_nan_base_weight_is_refused(bert):
    with torch.no_grad():
        bert.bert.encoder.layer[1].attention.self.value.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer.1.attention.self.value's weight holds NaN"):
        get_adapter_model(bert, HRAConfig(target_modules=["value"]))


def test_all_linear_skips_the_output_head(bert):
    model = get_adapter_model(bert, HRAConfig(r=2, target_modules="all-linear"))
    wrapped = {n for n, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)}
    assert "classifier" not in wrapped
    assert len(wrapped) == 2 * 6 + 1  # six linears per layer + pooler


def test_layers_to_transform_exclude_and_rank_pattern(bert):
    config = HRAConfig(
        r=4,
        target_modules=["query", "value", "key"],
        exclude_modules=["key"],
        layers_to_transform=[1],
        layers_pattern="layer",
        rank_pattern={"value": 2},
    )
    model = get_adapter_model(bert, config)
    ranks = {n: m.adapters["default"].r for n, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)}
    assert ranks == {"bert.encoder.layer.1.attention.self.query": 4, "bert.encoder.layer.1.attention.self.value": 2}


def test_regex_target_modules(bert):
    model = get_adapter_model(bert, HRAConfig(r=2, target_modules=r".*layer\.0\.attention\.self\.(query|key)"))
    wrapped = [n for n, m in model.base_model.named_modules() if isinstance(m, AdapterLayer)]
    assert wrapped == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key"]


# -- trainability, modules_to_save, bias -------------------------------------------------------------------
def test_only_adapter_and_saved_modules_train(bert, token_batch):
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    names = trainable_names(model)
    assert all("hra_u" in n or ".copies.default." in n for n in names)
    assert sum("hra_u" in n for n in names) == 2 and sum("copies" in n for n in names) == 2
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * 32 * 4 + 32 * 2 + 2
    assert total == sum(p.numel() for p in tiny_bert().parameters()) + trainable


def test_modules_to_save_copy_trains_and_disable_uses_original(bert, token_batch):
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    head = model.base_model.classifier
    with torch.no_grad():
        head.copies["default"].weight.add_(1.0)
    changed = model(**token_batch).logits
    with model.disable_adapter():
        original = model(**token_batch).logits
    assert torch.allclose(original, tiny_bert()(**token_batch).logits, atol=1e-6)
    assert not torch.allclose(changed, original, atol=1e-3)
    assert head.weight is head.copies["default"].weight  # attribute access reaches the active copy


@pytest.mark.parametrize("bias, expected", [("hra_only", 2), ("all", None)])
def test_bias_modes(bias, expected):
    model = get_adapter_model(tiny_bert(), HRAConfig(r=2, target_modules=["query"], bias=bias))
    biases = {n for n in trainable_names(model) if n.endswith("bias")}
    if expected is None:
        expected = sum(1 for n, _ in tiny_bert().named_parameters() if n.endswith("bias"))
    assert len(biases) == expected
    state = model.adapter_state_dict()
    assert sum(k.endswith("bias") for k in state) == expected
    assert "bert.encoder.layer.0.attention.self.query.bias" in state


# -- several adapters ------------------------------------------------------------------------------------------
def test_add_set_delete_and_disable(bert, token_batch):
    base_out = bert(**token_batch).logits
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query"], init_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value", "query"], init_weights=False))
    assert trainable_names(model) and all(".a." in n for n in trainable_names(model))
    out_a = model(**token_batch).logits
    model.set_adapter("b")
    assert all(".b." in n for n in trainable_names(model))
    out_b = model(**token_batch).logits
    model.set_adapter(["a", "b"])
    out_ab = model(**token_batch).logits
    outs = [base_out, out_a, out_b, out_ab]
    assert not any(torch.allclose(outs[i], outs[j], atol=1e-7, rtol=0) for i in range(4) for j in range(i))
    with model.disable_adapter():
        assert torch.allclose(model(**token_batch).logits, base_out, atol=1e-6)
    assert torch.allclose(model(**token_batch).logits, out_ab)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model.set_adapter("c")
    with pytest.raises(ValueError, match="exists already"):
        model.add_adapter("a", HRAConfig(target_modules=["query"]))
    model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    assert torch.allclose(model(**token_batch).logits, out_b, atol=1e-6)
    model.delete_adapter("b")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert torch.allclose(model(**token_batch).logits, base_out, atol=1e-6)


def test_disable_adapter_while_merged_restores_merge(bert, token_batch):
    base_out = bert(**token_batch).logits
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query", "value"], init_weights=False))
    adapted = model(**token_batch).logits
    model.merge()
    with model.disable_adapter():
        assert torch.allclose(model(**token_batch).logits, base_out, atol=1e-5)
    assert model.merged_adapters == ["default"]
    assert torch.allclose(model(**token_batch).logits, adapted, atol=1e-5)


# -- merging --------------------------------------------------------------------------------------------------------
def test_merge_and_unload_gives_a_plain_equal_model(bert, token_batch):
    model = get_adapter_model(
        bert, HRAConfig(r=4, target_modules=["query", "dense"], init_weights=False, modules_to_save=["classifier"])
    )
    with torch.no_grad():
        model.base_model.classifier.copies["default"].bias.add_(0.5)
    expected = model(**token_batch).logits
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert isinstance(plain.classifier, nn.Linear)
    assert torch.allclose(plain(**token_batch).logits, expected, atol=1e-5)


def test_unload_returns_the_original_model(bert, token_batch):
    expected = bert(**token_batch).logits
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query"], init_weights=False))
    model.merge()
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert torch.allclose(plain(**token_batch).logits, expected, atol=1e-5)


def test_safe_merge_refuses_non_finite_results_and_leaves_weights(bert):
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query", "value"], init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    value = model.base_model.bert.encoder.layer[1].attention.self.value
    with torch.no_grad():
        value.adapters["default"].hra_u[0, 0] = float("inf")
    with pytest.raises(MergeError, match=r"layer.1.attention.self.value gives non-finite values"):
        model.merge(safe_merge=True)
    after = {n: p.detach() for n, p in model.named_parameters() if "base_layer.weight" in n}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert model.merged_adapters == []


def test_switching_adapters_while_merged_is_refused(bert):
    model = get_adapter_model(bert, HRAConfig(r=2, target_modules=["query"]), "a")
    model.add_adapter("b", HRAConfig(r=2, target_modules=["query"]))
    model.merge()
    with pytest.raises(MergeError, match="unmerge"):
        model.set_adapter("b")


# -- LoRA baseline against HF PEFT -------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 12)
        self.conv = nn.Conv2d(12, 6, (3, 2), stride=(2, 1), padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))  # (B, L, 12)
        return self.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3))


def test_lora_matches_peft_on_linear_conv_and_embedding():
    torch.manual_seed(0)
    base = Mixed()
    ours = get_adapter_model(
        copy.deepcopy(base), LoraConfig(r=3, alpha=6, target_modules=["emb", "lin", "conv"], init_weights=False)
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "lin", "conv"])
    )
    with torch.no_grad():
        for name in ("lin", "conv", "emb"):
            ad = getattr(ours.base_model, name).adapters["default"]
            layer = getattr(theirs.base_model.model, name)
            if name == "emb":
                layer.lora_embedding_A["default"].copy_(ad.lora_A)
                layer.lora_embedding_B["default"].copy_(ad.lora_B)
            else:
                layer.lora_A["default"].weight.copy_(ad.lora_A.reshape(layer.lora_A["default"].weight.shape))
                layer.lora_B["default"].weight.copy_(ad.lora_B.reshape(layer.lora_B["default"].weight.shape))
    ids = torch.randint(0, 20, (2, 7))
    a, b = ours(ids), theirs(ids)
    assert torch.allclose(a, b, atol=1e-5)
    ours.merge()
    assert torch.allclose(ours(ids), b, atol=1e-5)


# -- saving and loading ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_with_several_adapters(bert, token_batch, tmp_path):
    model = get_adapter_model(
        bert, HRAConfig(r=4, target_modules=["query", "value"], init_weights=False, modules_to_save=["classifier"])
    )
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["key"], init_weights=False))
    with torch.no_grad():
        model.base_model.classifier.copies["default"].weight.mul_(3)
    expected = model(**token_batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, "lora"]
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["method"] == "hra" and saved["r"] == 4
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert not trainable_names(loaded) and not loaded.training
    assert torch.allclose(loaded(**token_batch).logits, expected, atol=1e-6)
    assert list(loaded.peft_config) == ["default", "lora"]  # every adapter in the folder is loaded
    model.set_adapter("lora")
    loaded.set_adapter("lora")
    assert torch.allclose(loaded(**token_batch).logits, model(**token_batch).logits, atol=1e-6)
    trainable = AdapterModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert any("hra_u" in n for n in trainable_names(trainable))


def test_writes_are_atomic(bert, tmp_path, monkeypatch):
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query"], init_weights=False))
    model.save_pretrained(tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        model.base_model.bert.encoder.layer[0].attention.self.query.adapters["default"].hra_u.add_(1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind


def test_corrupt_or_mismatched_checkpoints_give_clear_errors(bert, tmp_path):
    model = get_adapter_model(bert, HRAConfig(r=4, target_modules=["query"], init_weights=False))
    model.save_pretrained(tmp_path / "ok")
    # a model with other widths: the first mismatching module and both shapes are named
    from transformers import BertConfig, BertForSequenceClassification

    wide = BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(AdapterLoadError, match=r"layer.0.attention.self.query.*\(32, 4\) in the file but \(48, 4\)"):
        AdapterModel.from_pretrained(wide, tmp_path / "ok")
    # truncated weights file
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / CONFIG_NAME).write_text((tmp_path / "ok" / CONFIG_NAME).read_text())
    (tmp_path / "cut" / WEIGHTS_NAME).write_bytes((tmp_path / "ok" / WEIGHTS_NAME).read_bytes()[:100])
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        AdapterModel.from_pretrained(tiny_bert(), tmp_path / "cut")
    # NaN weights
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "ok" / WEIGHTS_NAME)
    next(iter(tensors.values()))[0, 0] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(tensors, tmp_path / "nan" / WEIGHTS_NAME)
    (tmp_path / "nan" / CONFIG_NAME).write_text((tmp_path / "ok" / CONFIG_NAME).read_text())
    with pytest.raises(AdapterLoadError, match="NaN"):
        AdapterModel.from_pretrained(tiny_bert(), tmp_path / "nan")
    # config that is not JSON, and a missing folder
    (tmp_path / "cut" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        AdapterModel.from_pretrained(tiny_bert(), tmp_path / "cut")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        AdapterModel.from_pretrained(tiny_bert(), tmp_path / "nowhere")


def test_adapter_for_other_module_names_is_refused(bert, tmp_path):
    model = get_adapter_model(bert, HRAConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="matched nothing"):
        AdapterModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), tmp_path)


def test_failed_merge_leaves_no_layer_merged(bert):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], init_weights=False), "a")
    model.add_adapter("b", HRAConfig(r=2, target_modules=["value"], init_weights=False))
    model.set_adapter(["a", "b"])
    value = model.base_model.bert.encoder.layer[1].attention.self.value.adapters["b"]

    def broken(weight, **options):
        raise RuntimeError("cannot merge this one")

    value.merged_weight = broken
    with pytest.raises(RuntimeError, match="cannot merge this one"):
        model.merge()
    assert model.merged_adapters == []
