"""The contract every registered method keeps with the shared plumbing.

Parametrised over the method registry (``peftlab.methods.base.ADAPTERS``), so a new method is covered
without editing this file. Each method is built generically, ``config_cls(r=2, target_modules=[...])``;
a method whose merge needs options supplies them through ``Adapter.example_merge_options()``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert
from torch import nn

import peftlab.methods  # noqa: F401  (registers every built-in method)
from peftlab import AdapterModel, get_adapter_model
from peftlab.config import METHODS
from peftlab.methods.base import ADAPTERS

TARGETS = ["query", "value"]
METHOD_NAMES = sorted(ADAPTERS)
ATOL = 1e-5


def test_every_registered_config_has_an_adapter():
    assert METHOD_NAMES and sorted(METHODS) == METHOD_NAMES


def make_config(method: str, **kwargs):
    return ADAPTERS[method].config_class(r=2, target_modules=TARGETS, **kwargs)


def perturb(model: AdapterModel, adapter_name: str, seed: int = 0) -> None:
    """Move every parameter of one adapter away from its initial value, so the adapter is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model._layers():
            if adapter_name in layer.adapters:
                for p in layer.adapters[adapter_name].parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def merge_options(model: AdapterModel, adapter_names: list[str]) -> dict:
    """The example merge options of the adapters (the same on every layer of one method)."""
    options: dict = {}
    for _, layer in model._layers():
        for name in adapter_names:
            if name in layer.adapters:
                options.update(layer.adapters[name].example_merge_options())
    return options


def merge_is_exact(model: AdapterModel, adapter_names: list[str]) -> bool:
    """Methods without merge options fold exactly what the forward computes."""
    return not merge_options(model, adapter_names)


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The last hidden states (O(1) values, so differences show) and the logits, flattened into one tensor."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


def base_weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {name: layer.base_layer.weight.detach().clone() for name, layer in model._layers()}


@pytest.fixture(params=METHOD_NAMES)
def method(request):
    return request.param


def test_starts_as_the_base_model(method, token_batch):
    expected = logits(tiny_bert(), token_batch)
    model = get_adapter_model(tiny_bert(), make_config(method))
    torch.testing.assert_close(logits(model, token_batch), expected, rtol=0, atol=ATOL)


def test_example_merge_options_are_the_declared_ones(method):
    model = get_adapter_model(tiny_bert(), make_config(method))
    assert set(merge_options(model, ["default"])) == set(ADAPTERS[method].merge_options)


def test_merge_and_unmerge(method, token_batch):
    base_out = logits(tiny_bert(), token_batch)
    model = get_adapter_model(tiny_bert(), make_config(method))
    perturb(model, "default")
    adapted = logits(model, token_batch)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    before = base_weights(model)
    model.merge(**merge_options(model, ["default"]))
    assert model.merged_adapters == ["default"]
    merged = logits(model, token_batch)
    assert not torch.allclose(merged, base_out, atol=1e-3)
    if merge_is_exact(model, ["default"]):
        torch.testing.assert_close(merged, adapted, rtol=0, atol=ATOL)
    model.unmerge()
    assert model.merged_adapters == []
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, token_batch), adapted, rtol=0, atol=ATOL)


def test_disable_adapter_while_merged(method, token_batch):
    base_out = logits(tiny_bert(), token_batch)
    model = get_adapter_model(tiny_bert(), make_config(method))
    perturb(model, "default")
    model.merge(**merge_options(model, ["default"]))
    merged = logits(model, token_batch)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, token_batch), base_out, rtol=0, atol=ATOL)
        assert model.merged_adapters == []
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(logits(model, token_batch), merged, rtol=0, atol=ATOL)


def test_save_and_load_round_trip(method, token_batch, tmp_path):
    model = get_adapter_model(tiny_bert(), make_config(method))
    perturb(model, "default")
    expected = logits(model, token_batch)
    model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"] == model.peft_config["default"]
    torch.testing.assert_close(logits(loaded, token_batch), expected, rtol=0, atol=0)


def test_delete_the_active_adapter(method, token_batch):
    model = get_adapter_model(tiny_bert(), make_config(method), "a")
    model.add_adapter("b", make_config(method))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    model.set_adapter("b")
    out_b = logits(model, token_batch)
    model.set_adapter("a")
    with pytest.warns(UserWarning, match="'b' is now active"):
        model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    torch.testing.assert_close(logits(model, token_batch), out_b, rtol=0, atol=ATOL)
    model.delete_adapter("b")
    assert model.active_adapters == [] and not list(model._layers())
    torch.testing.assert_close(logits(model, token_batch), logits(tiny_bert(), token_batch), rtol=0, atol=ATOL)


def test_two_adapters_active_at_once(method, token_batch):
    base_out = logits(tiny_bert(), token_batch)
    model = get_adapter_model(tiny_bert(), make_config(method), "a")
    model.add_adapter("b", make_config(method))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        model.set_adapter(active)
        outs[tuple(active)] = logits(model, token_batch)
    assert not torch.allclose(outs[("a", "b")], outs[("a",)], atol=1e-3)
    assert not torch.allclose(outs[("a", "b")], outs[("b",)], atol=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable) and any(".adapters.b." in n for n in trainable)
    before = base_weights(model)
    model.merge(**merge_options(model, ["a", "b"]))
    assert model.merged_adapters == ["a", "b"]
    if merge_is_exact(model, ["a", "b"]):
        torch.testing.assert_close(logits(model, token_batch), outs[("a", "b")], rtol=0, atol=ATOL)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, token_batch), base_out, rtol=0, atol=ATOL)
    model.unmerge()
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, token_batch), outs[("a", "b")], rtol=0, atol=ATOL)


def test_adapter_and_modules_to_save_train_and_save(method, token_batch, tmp_path):
    base = tiny_bert()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_adapter_model(base, make_config(method, modules_to_save=["classifier"]))
    perturb(model, "default")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".copies.default." in n for n in trainable) and any(".adapters.default." in n for n in trainable)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    labels = torch.tensor([0, 1, 1])
    loss = nn.functional.cross_entropy(model(**token_batch).logits, labels) + model.extra_loss()
    loss.backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(p, start[n]) for n, p in trainable.items())
    for name, p in model.base_model.named_parameters():  # the base model, original head included, is untouched
        key = name.replace(".base_layer", "").replace(".original", "")
        if ".copies." not in name and ".adapters." not in name:
            assert torch.equal(p, frozen[key]), name
    state = model.adapter_state_dict()
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    expected = logits(model, token_batch)
    model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, token_batch), expected, rtol=0, atol=0)
