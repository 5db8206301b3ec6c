"""Habits users bring from HF PEFT: disable_adapter while merged, plain HF Trainer, deleting the active
adapter, shared biases and modules_to_save, in/out_features on wrapped layers, multi-adapter folders."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2
from torch import nn

from peftlab import (
    AdapterError,
    AdapterLayer,
    AdapterLoadError,
    AdapterModel,
    HRAConfig,
    HydraLoraConfig,
    LoraConfig,
    MergeError,
    get_adapter_model,
)
from peftlab.methods.base import Adapter


# -- A: merge options are part of the merge record ---------------------------------------------------------------
def test_hydralora_merged_with_head_weights_survives_disable_adapter(token_batch):
    base = tiny_bert()
    base_out = base(**token_batch).logits
    config = HydraLoraConfig(r=2, num_heads=3, target_modules=["query", "value"], init_weights=False)
    model = get_adapter_model(base, config)
    routed_out = model(**token_batch).logits
    weights = [0.2, 0.3, 0.5]
    model.merge(head_weights=weights)
    merged_out = model(**token_batch).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(**token_batch).logits, base_out, rtol=0, atol=1e-5)
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(model(**token_batch).logits, merged_out, rtol=0, atol=1e-5)
    for _, layer in model._layers():
        assert layer.merge_record == {"default": {"head_weights": weights}}
    model.unmerge()
    torch.testing.assert_close(model(**token_batch).logits, routed_out, rtol=0, atol=1e-5)
    # the adapter keeps no hidden merge state: what was merged, and how, lives in the layer's record
    assert not any("merge" in key for a in model.modules() if isinstance(a, Adapter) for key in vars(a))


def test_unknown_merge_options_are_refused(token_batch):
    model = get_adapter_model(tiny_bert(), HydraLoraConfig(r=2, num_heads=2, target_modules=["query"]))
    with pytest.raises(MergeError, match=r"head_weight\b.*head_weights"):
        model.merge(head_weight=[0.5, 0.5])
    assert model.merged_adapters == []



# -- B: plain transformers.Trainer -------------------------------------------------------------------------------
def _token_rows(n: int, causal: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 10), generator=g)
    rows = []
    for row in ids:
        labels = row.clone() if causal else (row[0] > 50).long()
        rows.append({"input_ids": row, "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels,
                     "text": "a column the model does not take"})
    return rows


@pytest.mark.parametrize("causal", [False, True], ids=["bert-classifier", "gpt2-causal-lm"])
@pytest.mark.parametrize("as_datasets", [False, True], ids=["torch-rows", "datasets.Dataset"])
def test_plain_hf_trainer_trains_only_the_adapter(tmp_path, causal, as_datasets):
    import transformers

    base = tiny_gpt2() if causal else tiny_bert()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    targets = ["c_attn"] if causal else ["query", "value"]
    model = get_adapter_model(base, LoraConfig(r=2, target_modules=targets, init_weights=False))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = _token_rows(16, causal)
    if as_datasets:
        import datasets

        rows = datasets.Dataset.from_list([{k: v.tolist() if torch.is_tensor(v) else v for k, v in r.items()}
                                           for r in rows])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=2e-2, max_steps=8, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )
    assert args.remove_unused_columns
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    assert trainer.label_names == ["labels"]
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    for name, param in model.base_model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(param, frozen[key]), name


def test_forward_signature_is_the_wrapped_models(bert):
    import inspect

    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"]))
    params = list(inspect.signature(model.forward).parameters)
    assert params == list(inspect.signature(tiny_bert().forward).parameters)
    assert "labels" in params


def test_adapter_model_pickles_and_deep_copies(bert, token_batch):
    import copy
    import pickle

    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], init_weights=False))
    expected = model(**token_batch).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is type(model) and isinstance(clone, AdapterModel)
        torch.testing.assert_close(clone(**token_batch).logits, expected)
    assert type(model).__name__ == "AdapterModel[BertForSequenceClassification]"


# -- C: deleting the active adapter activates a remaining one -------------------------------------------------------
def test_deleting_the_active_adapter_activates_the_first_remaining_one(bert, token_batch):
    base_out = bert(**token_batch).logits
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], init_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"], init_weights=False))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["key"], init_weights=False))
    model.set_adapter("b")
    out_b = model(**token_batch).logits
    model.set_adapter("a")
    with pytest.warns(UserWarning, match="'a'.*deleted.*'b'"):
        model.delete_adapter("a")
    assert model.active_adapters == ["b"] and model.active_adapter == "b"
    torch.testing.assert_close(model(**token_batch).logits, out_b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".adapters.b." in n
    }
    model.set_adapter(["b", "c"])
    model.delete_adapter("b")  # another active adapter remains: it stays the only active one
    assert model.active_adapters == ["c"]
    model.delete_adapter("c")
    assert model.active_adapters == [] and model.peft_config == {}
    torch.testing.assert_close(model(**token_batch).logits, base_out)


# -- D: only one adapter may train the shared base biases -----------------------------------------------------------
@pytest.mark.parametrize("first", ["all", "lora_only"])
@pytest.mark.parametrize("second", ["all", "lora_only"])
def test_a_second_adapter_that_trains_biases_is_refused(bert, first, second):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], bias=first), "a")
    with pytest.raises(AdapterError, match=rf"bias='{second}'.*'a'.*bias='{first}'.*bias='none'"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["value"], bias=second))
    assert list(model.peft_config) == ["a"]
    assert not any(".adapters.b." in n for n, _ in model.named_parameters())
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"]))  # bias="none" is fine


# -- E: active adapters may not share a modules_to_save module --------------------------------------------------------
def test_active_adapters_with_overlapping_modules_to_save_are_refused(bert, token_batch):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["key"]))
    with pytest.raises(AdapterError, match=r"\['a', 'b'\].*classifier.*modules_to_save"):
        model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a"]
    model.set_adapter(["b", "c"])  # only b has a copy of the classifier: fine, and b's copy runs and trains
    assert model.base_model.classifier.current() is model.base_model.classifier.copies["b"]
    assert all(p.requires_grad for p in model.base_model.classifier.copies["b"].parameters())
    assert not any(p.requires_grad for p in model.base_model.classifier.copies["a"].parameters())


# -- F: wrapped layers look like PEFT's: in/out_features, and disable_adapter freezes the adapters ---------------------
class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(10, 6, (3, 2), padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))
        return self.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3))


@pytest.mark.parametrize("kind", ["linear-conv2d-embedding", "conv1d"])
def test_wrapped_layers_expose_in_and_out_features_like_peft(kind):
    import peft

    make, targets = (_Mixed, ["emb", "lin", "conv"]) if kind != "conv1d" else (tiny_gpt2, ["c_attn", "c_fc"])
    ours = get_adapter_model(make(), LoraConfig(r=2, target_modules=targets))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=targets))
    wrapped = dict(ours._layers())
    assert len(wrapped) >= len(targets)
    for name, layer in wrapped.items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (peft_layer.in_features, peft_layer.out_features), name
    if kind == "conv1d":
        c_attn = ours.base_model.transformer.h[0].attn.c_attn
        assert (c_attn.in_features, c_attn.out_features) == (32, 96)


def test_disable_adapter_freezes_adapters_like_peft(bert, token_batch):
    import peft

    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"],
                                                              modules_to_save=["classifier"]))

    def trainable(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    before = trainable(model)
    assert before == trainable(theirs) > 0
    with model.disable_adapter(), theirs.disable_adapter():
        assert trainable(model) == trainable(theirs) == 0
        model(**token_batch)
    assert trainable(model) == trainable(theirs) == before
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters.default." in n)


def test_disable_adapter_warns_that_trained_biases_stay(bert):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], bias="lora_only"))
    with pytest.warns(UserWarning, match="keeps the trained biases"), model.disable_adapter():
        pass


# -- G: from_pretrained loads every adapter of a multi-adapter folder -------------------------------------------------
def test_from_pretrained_loads_every_adapter_in_the_folder(bert, token_batch, tmp_path):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], init_weights=False))
    model.add_adapter("other", HRAConfig(r=2, target_modules=["value"], init_weights=False))
    model.add_adapter("head", LoraConfig(r=2, target_modules=["key"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.base_model.classifier.copies["head"].weight.mul_(2)
    expected = {}
    for name in model.peft_config:
        model.set_adapter(name)
        expected[name] = model(**token_batch).logits
    model.save_pretrained(tmp_path)
    # a training checkpoint inside the folder is not one of its adapters
    model.save_pretrained(tmp_path / "checkpoint-2", selected_adapters=["default"])
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")

    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert list(loaded.peft_config) == ["default", "head", "other"]
    assert loaded.active_adapters == ["default"] and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for name in ["default", "head", "other"]:
        loaded.set_adapter(name)
        torch.testing.assert_close(loaded(**token_batch).logits, expected[name])

    # a single-adapter folder still loads under the name asked for
    single = AdapterModel.from_pretrained(tiny_bert(), tmp_path / "other", adapter_name="mine")
    assert list(single.peft_config) == ["mine"] and single.active_adapters == ["mine"]
    torch.testing.assert_close(single(**token_batch).logits, expected["other"])


def test_from_pretrained_of_a_folder_without_a_default_adapter(bert, token_batch, tmp_path):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], init_weights=False), "b")
    model.add_adapter("a", LoraConfig(r=2, target_modules=["value"], init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert list(loaded.peft_config) == ["a", "b"] and loaded.active_adapters == ["a"]
    assert any(p.requires_grad for p in loaded.parameters())
    model.set_adapter("a")
    torch.testing.assert_close(loaded(**token_batch).logits, model(**token_batch).logits)


def test_from_pretrained_that_fails_on_one_adapter_leaves_the_model_plain(bert, tmp_path):
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["value"]))
    model.save_pretrained(tmp_path)
    (tmp_path / "other" / "adapter_model.safetensors").write_bytes(b"broken")
    fresh = tiny_bert()
    with pytest.raises(AdapterLoadError, match="other"):
        AdapterModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in fresh.modules())


# -- H: load_adapter into a name that exists replaces its weights (HF PEFT's habit) --------------------------------
def test_load_adapter_into_an_existing_name_replaces_its_weights(bert, token_batch, tmp_path):
    """PEFT's tests save a two-adapter model, load the folder, then ``load_adapter(folder / "other", "other")``
    (test_save_pretrained_selected_adapters, test_adapter_dtype_autocast): from_pretrained restored "other"
    already, so the second load must replace its weights, not fail."""
    model = get_adapter_model(bert, LoraConfig(r=2, target_modules=["query"], init_weights=False))
    model.add_adapter("other", HRAConfig(r=2, target_modules=["value"], init_weights=False))
    model.save_pretrained(tmp_path / "first")
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path / "first")
    loaded.load_adapter(tmp_path / "first" / "other", adapter_name="other")  # the PEFT habit: same weights again
    assert list(loaded.peft_config) == ["default", "other"]
    loaded.set_adapter("other")
    model.set_adapter("other")
    torch.testing.assert_close(loaded(**token_batch).logits, model(**token_batch).logits)

    with torch.no_grad():  # other weights, same config: they replace the loaded ones
        for p in model.adapter_parameters("other").values():
            p.add_(0.3)
    retrained = model(**token_batch).logits
    model.save_pretrained(tmp_path / "second", selected_adapters=["other"])
    assert not torch.allclose(loaded(**token_batch).logits, retrained)
    loaded.load_adapter(tmp_path / "second" / "other", adapter_name="other")
    torch.testing.assert_close(loaded(**token_batch).logits, retrained)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False, as asked
    loaded.load_adapter(tmp_path / "second" / "other", adapter_name="other", is_trainable=True)
    assert any(p.requires_grad for p in loaded.adapter_parameters("other").values())


@pytest.mark.parametrize("config", [HRAConfig(r=4, target_modules=["value"]), LoraConfig(r=2, target_modules=["value"]),
                                    HRAConfig(r=2, target_modules=["value"], orthogonality_weight=0.5)],
                         ids=["other rank", "other method", "other hyperparameter"])
def test_load_adapter_into_an_existing_name_with_another_config_is_refused(bert, token_batch, tmp_path, config):
    model = get_adapter_model(bert, HRAConfig(r=2, target_modules=["value"], init_weights=False))
    model.save_pretrained(tmp_path / "mine")
    get_adapter_model(tiny_bert(), config).save_pretrained(tmp_path / "theirs")
    expected = model(**token_batch).logits
    with pytest.raises(AdapterLoadError, match=r"existing adapter 'default': its config differs \(.*delete_adapter"):
        model.load_adapter(tmp_path / "theirs", adapter_name="default")
    assert list(model.peft_config) == ["default"] and model.peft_config["default"].r == 2
    torch.testing.assert_close(model(**token_batch).logits, expected, rtol=0, atol=0)
