"""Low-memory loading (``low_cpu_mem_usage=True``): adapters built on the meta device and materialised from
the checkpoint's tensors give exactly the model an ordinary load gives, for every registered method."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import OTHER_MEMORY, tiny_bert
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterError, AdapterLoadError, AdapterModel, get_adapter_model
from peftlab.inject import AdapterLayer, TrainableCopy
from peftlab.lowmem import refuse_unloaded
from peftlab.methods.base import ADAPTERS

METHOD_NAMES = sorted(ADAPTERS)


@pytest.fixture(params=METHOD_NAMES)
def method(request):
    return request.param


def make_config(method: str, **kwargs):
    return ADAPTERS[method].config_class(r=2, target_modules=["query", "value"], **kwargs)


def trained_model(method: str, seed: int = 0) -> AdapterModel:
    """Two adapters (the second without a head copy) with every trainable tensor moved off its init."""
    model = get_adapter_model(tiny_bert(), make_config(method, modules_to_save=["classifier"]))
    model.add_adapter("second", make_config(method))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".copies." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def every_tensor(model: nn.Module):
    """(name, tensor) for every parameter, buffer and plain tensor attribute of every submodule."""
    for module_name, module in model.named_modules():
        for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False),
                            *vars(module).items()]:
            if isinstance(value, torch.Tensor):
                yield f"{module_name}.{name}", value


def guards(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if any(getattr(h, "func", None) is refuse_unloaded for h in m._forward_pre_hooks.values())]


def outputs(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


@pytest.mark.parametrize("is_trainable", [False, True])
def test_low_memory_load_equals_the_ordinary_load(method, is_trainable, token_batch, tmp_path):
    trained_model(method).save_pretrained(tmp_path)
    ordinary = AdapterModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=is_trainable)
    low = AdapterModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=is_trainable, low_cpu_mem_usage=True)
    expected, got = ordinary.state_dict(keep_vars=True), low.state_dict(keep_vars=True)
    assert list(got) == list(expected)
    for key, tensor in got.items():
        assert tensor.dtype == expected[key].dtype and tensor.device == expected[key].device, key
        assert tensor.requires_grad == expected[key].requires_grad, key
        assert torch.equal(tensor, expected[key]), key
    assert [n for n, t in every_tensor(low) if t.is_meta] == []
    assert guards(low) == []
    assert low.peft_config == ordinary.peft_config and low.active_adapters == ordinary.active_adapters
    for name in ("default", "second"):
        ordinary.set_adapter(name)
        low.set_adapter(name)  # equal values; the low-memory ones are the file's tensors, at other alignments
        torch.testing.assert_close(outputs(low, token_batch), outputs(ordinary, token_batch), **OTHER_MEMORY)


def test_meta_adapter_refuses_to_run_merge_and_save_until_loaded(method, token_batch, tmp_path):
    source = trained_model(method)
    model = get_adapter_model(tiny_bert(), make_config(method, modules_to_save=["classifier"]), low_cpu_mem_usage=True)
    tensors = [t for n, t in every_tensor(model) if ".adapters.default." in n or ".copies.default." in n]
    assert tensors and all(t.is_meta for t in tensors)
    assert set(guards(model.base_model)) == {n for n, _ in (*model._layers(), *model._copies())}
    for action in (lambda: model(**token_batch), lambda: model.merge(**model_merge_options(source)),
                   lambda: model.save_pretrained(tmp_path)):
        with pytest.raises(AdapterError, match="meta device.*set_adapter_state_dict"):
            action()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with model.disable_adapter():  # the base model alone needs no adapter values
        torch.testing.assert_close(outputs(model, token_batch), outputs(tiny_bert(), token_batch), rtol=0, atol=0)

    state = source.adapter_state_dict("default")
    model.set_adapter_state_dict(state)
    live = model.adapter_parameters("default")
    assert all(live[k].data_ptr() == state[k].data_ptr() for k in state)  # assigned, not allocated and copied
    assert guards(model) == [] and not any(t.is_meta for _, t in every_tensor(model))
    source.set_adapter("default")
    torch.testing.assert_close(outputs(model, token_batch), outputs(source, token_batch), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in get_adapter_model(tiny_bert(), make_config(
        method, modules_to_save=["classifier"])).named_parameters() if p.requires_grad}


def model_merge_options(model: AdapterModel) -> dict:
    return next(iter(layer.adapters["default"].example_merge_options() for _, layer in model._layers()))


def test_an_inactive_meta_adapter_does_not_block_the_active_one(token_batch):
    model = trained_model("lora")
    expected = outputs(model, token_batch)
    model.add_adapter("later", make_config("lora"), low_cpu_mem_usage=True)
    torch.testing.assert_close(outputs(model, token_batch), expected, rtol=0, atol=0)
    model.set_adapter("later")
    with pytest.raises(AdapterError, match="'later'"):
        model(**token_batch)


def test_a_mismatched_state_dict_leaves_the_meta_adapter_untouched(token_batch):
    model = get_adapter_model(tiny_bert(), make_config("lora"), low_cpu_mem_usage=True)
    state = trained_model("lora").adapter_state_dict("second")
    key = next(iter(state))
    with pytest.raises(AdapterLoadError, match="has no tensor for"):
        model.set_adapter_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterLoadError, match="shape"):
        model.set_adapter_state_dict({**state, key: torch.zeros(3, 3)})
    assert all(t.is_meta for t in model.adapter_parameters("default").values())
    with pytest.raises(AdapterError, match="meta device"):
        model(**token_batch)


def no_trace_of_loading(base: nn.Module) -> None:
    """The base model is as it was: no wrapper, no meta tensor, no guard."""
    assert not any(isinstance(m, (AdapterLayer, TrainableCopy)) for m in base.modules())
    assert [n for n, t in every_tensor(base) if t.is_meta] == []
    assert guards(base) == []


@pytest.mark.parametrize("damage", ["truncated", "missing tensor", "wrong rank", "broken second adapter"])
def test_a_bad_checkpoint_gives_adapter_load_error_and_leaves_no_meta_tensor(damage, tmp_path, token_batch):
    trained_model("hra").save_pretrained(tmp_path)
    weights = tmp_path / ("second" if damage == "broken second adapter" else "") / "adapter_model.safetensors"
    if damage in ("truncated", "broken second adapter"):
        weights.write_bytes(weights.read_bytes()[:-40])
        match = "not a readable safetensors file"
    elif damage == "missing tensor":
        tensors = load_file(weights)
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, weights)
        match = "has no tensor for"
    else:
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
        match = "the config says r=4 but the weights have rank 2"
    base = tiny_bert()
    expected = outputs(base, token_batch)
    with pytest.raises(AdapterLoadError, match=match):
        AdapterModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    no_trace_of_loading(base)
    torch.testing.assert_close(outputs(base, token_batch), expected, rtol=0, atol=0)


def test_peft_format_folders_load_with_low_memory(token_batch, tmp_path):
    for method in ("hra", "lora"):
        model = get_adapter_model(tiny_bert(), make_config(method))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        model.save_pretrained(tmp_path / method, format="peft")
        ordinary = AdapterModel.from_pretrained(tiny_bert(), tmp_path / method)
        low = AdapterModel.from_pretrained(tiny_bert(), tmp_path / method, low_cpu_mem_usage=True)
        torch.testing.assert_close(outputs(low, token_batch), outputs(ordinary, token_batch), **OTHER_MEMORY)


def test_half_precision_files_are_converted_to_the_adapter_dtype(tmp_path, token_batch):
    trained_model("lora").save_pretrained(tmp_path, selected_adapters=["default"])
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    ordinary = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    low = AdapterModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=True)
    assert {p.dtype for p in low.adapter_parameters("default").values()} == {torch.float32}
    torch.testing.assert_close(outputs(low, token_batch), outputs(ordinary, token_batch), rtol=0, atol=0)


def test_each_materialised_adapter_is_told_so(monkeypatch, tmp_path):
    """``Adapter.materialised`` runs once per layer after its values are loaded (where a method recomputes
    cached state), on real tensors, with or without ``low_cpu_mem_usage``."""
    from peftlab.methods.hra import HRAAdapter

    calls = []
    monkeypatch.setattr(HRAAdapter, "materialised", lambda self: calls.append(self.hra_u.is_meta))
    trained_model("hra").save_pretrained(tmp_path, selected_adapters=["default"])
    for low_cpu_mem_usage in (False, True):
        calls.clear()
        model = AdapterModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert calls == [False] * len(list(model._layers())) and calls


def test_a_model_with_a_meta_adapter_copies_and_pickles(token_batch):
    import copy
    import pickle

    model = get_adapter_model(tiny_bert(), make_config("lora"), low_cpu_mem_usage=True)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(AdapterError, match="meta device"):
            clone(**token_batch)
        clone.set_adapter_state_dict(trained_model("lora").adapter_state_dict("second"))
        assert outputs(clone, token_batch).isfinite().all()


def test_a_mixed_batch_naming_a_meta_adapter_is_refused(token_batch):
    model = trained_model("lora").eval()
    model.add_adapter("later", make_config("lora"), low_cpu_mem_usage=True)
    with pytest.raises(AdapterError, match="'later'.*meta device"):
        model(**token_batch, adapter_names=["default", "later", "__base__"])
    with torch.no_grad():  # the loaded adapters still run mixed
        mixed = model(**token_batch, adapter_names=["default", "second", "__base__"]).logits
    assert mixed.shape[0] == 3 and mixed.isfinite().all()
